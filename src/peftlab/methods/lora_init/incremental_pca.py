"""Incremental PCA over batches of activations, EVA's estimator (HF peft's ``IncrementalPCA``, itself
scikit-learn's in torch), reduced to what EVA uses: ``partial_fit`` with the randomized SVD
(``torch.svd_lowrank``, q = 2·n_components, 4 iterations, seed 42 in a forked RNG so the caller's
stream is untouched). The arithmetic is HF's, step for step, so the components are HF's.
"""

from __future__ import annotations

import torch

LOWRANK_SEED = 42
LOWRANK_NITER = 4


class IncrementalPCA:
    def __init__(self, n_components: int) -> None:
        self.n_components = n_components
        self.components_: torch.Tensor | None = None

    @staticmethod
    def _mean_and_var(x, last_mean, last_var, last_count):
        new_count = torch.tensor([x.shape[0]], device=x.device)
        count = last_count + new_count
        last_sum = torch.zeros(x.shape[1], dtype=torch.float64, device=x.device) if last_mean is None else last_mean * last_count
        new_sum = x.sum(dim=0, dtype=torch.float64)
        mean = (last_sum + new_sum) / count
        centred = x - new_sum / new_count
        correction = centred.sum(dim=0, dtype=torch.float64).square()
        new_unnormalized = centred.square_().sum(dim=0, dtype=torch.float64) - correction / new_count
        if last_var is None:
            return mean, new_unnormalized / count, count
        ratio = last_count.double() / new_count
        unnormalized = last_var * last_count + new_unnormalized + ratio / count * (last_sum / ratio - new_sum).square()
        return mean, unnormalized / count, count

    @staticmethod
    def _flip_signs(u, vt):
        # Each right singular vector's largest entry made positive (scikit-learn's svd_flip, v-based).
        signs = torch.sign(vt[range(vt.shape[0]), torch.argmax(torch.abs(vt), dim=1)])
        return u * signs[: u.shape[1]].view(1, -1), vt * signs.view(-1, 1)

    def partial_fit(self, x: torch.Tensor) -> IncrementalPCA:
        x = x.clone() if x.dtype in (torch.float32, torch.float64) else x.to(torch.float32)
        n_samples, n_features = x.shape
        if self.n_components > n_features:
            raise ValueError(f"EVA asks for {self.n_components} components of a layer with {n_features} inputs; lower r or rho.")
        first = self.components_ is None
        if first:
            self.mean_, self.var_, self.n_samples_seen_ = None, None, torch.tensor([0], device=x.device)
        mean, var, total = self._mean_and_var(x, self.mean_, self.var_, self.n_samples_seen_)
        if first:
            x -= mean
        else:
            batch_mean = torch.mean(x, dim=0)
            x -= batch_mean
            correction = torch.sqrt((self.n_samples_seen_.double() / total) * n_samples) * (self.mean_ - batch_mean)
            x = torch.vstack((self.singular_values_.view((-1, 1)) * self.components_, x, correction))
        with torch.random.fork_rng():
            torch.manual_seed(LOWRANK_SEED)
            u, s, v = torch.svd_lowrank(x, q=2 * self.n_components, niter=LOWRANK_NITER)
        _, vt = self._flip_signs(u, v.mH)
        self.n_samples_seen_ = total
        self.components_ = vt[: self.n_components]
        self.singular_values_ = s[: self.n_components]
        self.mean_, self.var_ = mean, var
        self.explained_variance_ratio_ = (s**2 / torch.sum(var * total))[: self.n_components]
        return self
