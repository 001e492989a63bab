"""The models one server serves, each with its own pool (scheduler, admission budget and sessions), so that one
model's overload or failure never holds up another's requests; and how a request's model and input type are
resolved: the name it gives (or the default, the first), the model a collection is bound to, the prompt.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from dataclasses import dataclass

from embedpool.engine import ServingModel
from embedpool.errors import InvalidArgument, ModelNotFound
from embedpool.pool import EmbeddingPool
from embedpool.service.writes import DocumentWriter
from embedpool.store import CollectionInfo, Store

__all__ = ["DOCUMENT", "QUERY", "Models", "ServedModel", "prompt_for"]

QUERY = "query"
DOCUMENT = "document"
# sentence-transformers checkpoints name their document prompt either way (e5: "passage: ").
_DOCUMENT_PROMPTS = (DOCUMENT, "passage", "corpus")


@dataclass(frozen=True)
class ServedModel:
    model: ServingModel
    pool: EmbeddingPool
    writer: DocumentWriter

    @property
    def name(self) -> str:
        return self.model.name

    @property
    def label(self) -> str:
        """name/variant: what vectors of this model were made with, for cache keys and metrics."""
        return f"{self.model.name}/{self.model.variant}"

    def prompt(self, input_type: str | None, field: str = "input_type") -> str:
        return prompt_for(self.model, input_type, field)


def prompt_for(model: ServingModel, input_type: str | None, field: str = "input_type") -> str:
    """The text put before each input: the model's prompt for `input_type` (query, document, or one of its
    prompts by name), or its default prompt when none is given. A model without the prompt gets none for query
    and document; any other unknown name is an error."""
    prompts = model.prompts
    if not input_type:
        return prompts.get(model.default_prompt_name, "") if model.default_prompt_name else ""
    if input_type in prompts:
        return prompts[input_type]
    if input_type == DOCUMENT:
        return next((prompts[name] for name in _DOCUMENT_PROMPTS if name in prompts), "")
    if input_type == QUERY:
        return ""
    names = ", ".join(sorted({QUERY, DOCUMENT, *prompts}))
    raise InvalidArgument(f"{field}: {model.name} has no prompt {input_type[:60]!r}; it takes {names}")


class Models:
    def __init__(self, served: Sequence[ServedModel]) -> None:
        if not served:
            raise ValueError("a server serves at least one model")
        self._served = list(served)
        self._by_name = {s.name: s for s in served}

    @classmethod
    def of(cls, pools: Sequence[tuple[EmbeddingPool, ServingModel]], store: Store) -> Models:
        return cls(
            [
                ServedModel(model, pool, DocumentWriter(pool, store, model, prompt_for(model, DOCUMENT)))
                for pool, model in pools
            ]
        )

    @property
    def default(self) -> ServedModel:
        """The first: what a request that names no model gets."""
        return self._served[0]

    def __iter__(self) -> Iterator[ServedModel]:
        return iter(self._served)

    def __len__(self) -> int:
        return len(self._served)

    def named(self, name: str | None, field: str = "model") -> ServedModel:
        """The model `name` means: its name, name/variant, or a hub-style org/name; the default when empty."""
        if not name:
            return self.default
        for served in self._served:
            if name in (served.name, served.label) or name.rsplit("/", 1)[-1] == served.name:
                return served
        names = ", ".join(repr(s.name) for s in self._served)
        raise ModelNotFound(f"{field}: {name[:100]!r} is not served here; this server serves {names}")

    def of_collection(self, info: CollectionInfo, requested: str | None = None, field: str = "model") -> ServedModel:
        """The model `info`'s vectors were made with, which every write to it and every text search of it uses;
        a request naming another model is refused rather than answered with the collection's."""
        served = self._by_name.get(info.model)
        # A collection may hold Matryoshka-reduced vectors of its model (CreateCollection dimensions).
        if served is None or info.dim not in (served.model.dim, *served.model.dimensions):
            names = ", ".join(repr(s.name) for s in self._served)
            raise InvalidArgument(
                f"collection {info.name!r} holds {info.model} vectors of dim {info.dim}; this server serves {names}"
            )
        if requested and self.named(requested, field) is not served:
            raise InvalidArgument(f"{field}: collection {info.name!r} holds {info.model} vectors, not {requested!r}")
        return served
