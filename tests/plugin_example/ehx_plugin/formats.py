"""``ehx_category``: the generic manifest format, restricted to one edit category."""
from __future__ import annotations

from typing import Any

from harness.data import GenericDataset, SampleRef


class CategoryDataset(GenericDataset):
    """The samples of one ``category``, in manifest order; ``limit`` counts within the category."""

    def __init__(self, root: Any, category: str, limit: int | None = None, **kwargs: Any):
        super().__init__(root, **kwargs)
        self.category, self.category_limit = str(category), limit

    def refs(self) -> list[SampleRef]:
        refs = [r for r in super().refs() if r.category == self.category]
        return refs if self.category_limit is None else refs[: int(self.category_limit)]
