"""Export to llama.cpp / Ollama (GGUF) with parity measured in the engine; see :mod:`.exporter`."""

from peftlab.gguf_export.exporter import MODES, GGUFExport, export_gguf, llama_cpp_available
from peftlab.gguf_export.metadata import GGUFExportError
from peftlab.gguf_export.names import UnsupportedArchitectureError
from peftlab.gguf_export.verify import ParityError

__all__ = ["MODES", "GGUFExport", "GGUFExportError", "ParityError", "UnsupportedArchitectureError", "export_gguf",
           "llama_cpp_available"]
