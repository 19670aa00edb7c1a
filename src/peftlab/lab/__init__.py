"""The comparison lab's output side.

``results``: the results.json contract (load, save, CSV); ``plots``: one PNG per comparison;
``report``: report.md, a self-contained report.html, and a terminal table.
Nothing is imported here, so a training process can read/write results without loading matplotlib.
"""
