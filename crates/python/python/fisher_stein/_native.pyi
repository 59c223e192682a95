"""Type stubs of the compiled extension `fisher_stein._native` (crates/python/src/lib.rs).
Use the wrappers in `fisher_stein` (`load`, `Model.fisher`, `load_results`) rather than these."""

from typing import List, Optional

__version__: str

def backends() -> List[str]:
    """The engines compiled into this build."""

class Model:
    """A model loaded once on its own worker thread."""

    def __init__(
        self,
        model: str,
        backend: str = "candle",
        device: str = "cpu",
        batch_size: Optional[int] = None,
    ) -> None: ...
    def info_json(self) -> str:
        """What was loaded, as a JSON object."""
    def tokenize(self, text: str) -> List[int]:
        """Token ids as `compute --text` makes them."""
    def decode(self, ids: List[int]) -> str:
        """The text of token ids."""
    def compute(self, argv: List[str]) -> None:
        """`fisher-stein compute` with these arguments on the held model (GIL released;
        KeyboardInterrupt stops it). Raises ValueError / FileNotFoundError with the command
        line's one-line message."""
