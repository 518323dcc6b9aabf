"""What every policy driven by a learner's model snapshot shares: hot swap, version, when to trust it."""

from __future__ import annotations

from lodestar.snapshot import Snapshot
from lodestar.ttft_model import TTFTModel


class SnapshotModelMixin:
    """Holds the current TTFT model (None before the first snapshot); `require_validated` gates its use."""

    model: TTFTModel | None
    require_validated: bool

    def load_snapshot(self, snapshot: Snapshot) -> None:
        """Swap in a new model; a snapshot this build cannot evaluate raises SnapshotError (model kept)."""
        self.model = TTFTModel(snapshot)

    @property
    def model_version(self) -> int:
        return 0 if self.model is None else self.model.version

    def _model_usable(self) -> bool:
        return self.model is not None and (self.model.validated or not self.require_validated)
