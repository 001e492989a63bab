"""Request and response bodies of the HTTP door: strict (unknown fields and wrong types are the caller's 400),
documented in /openapi.json. Shapes only: limits and content checks are the core's (service.limits), one
definition for both doors."""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", strict=True)


Encoding = Literal["float", "base64", "base64_float16", "base64_int8", "base64_binary"]
"""float: JSON numbers; base64: little-endian float32 bytes (OpenAI's); the others are embedpool extensions,
packed as service.encodings says (the same bytes as gRPC's VectorEncoding)."""

_ENCODING_DOC = (
    "float: JSON numbers; base64: little-endian float32 bytes, base64 (OpenAI's). embedpool extensions, base64:"
    " base64_float16: little-endian IEEE float16 bytes; base64_int8: a little-endian float32 scale (max|x|/127)"
    " then dim int8 q, component i = q[i] * scale; base64_binary: sign bits (1 where a component is > 0), most"
    " significant bit first, ceil(dim/8) bytes, for Hamming-distance prefiltering"
)


class LongInputFields(_Strict):
    """embedpool's long-input options, on every request that embeds texts."""

    truncate: bool = Field(True, description="embedpool: cut over-long texts to the model's limit (else 400)")
    long_inputs: Literal["truncate", "error", "chunk"] | None = Field(
        None,
        description="embedpool: over-long texts cut (truncate), refused with 400 (error), or embedded whole in windows"
        " of the model's length pooled into one vector (chunk); default: by `truncate`",
    )
    chunk_overlap_tokens: int = Field(0, description="embedpool, chunk: tokens each window shares with the one before")
    max_windows: int = Field(0, description="embedpool, chunk: windows of the whole request, at most (0: the server's)")


class EmbeddingsRequest(LongInputFields):
    """OpenAI's embeddings request."""

    input: str | list[str] | list[int] | list[list[int]] = Field(
        description="A text or a list of texts (token-id arrays are not supported: send text)"
    )
    model: str = Field(description="The served model's name (GET /v1/models lists it)")
    encoding_format: Encoding = Field("float", description=_ENCODING_DOC)
    dimensions: int | None = Field(
        None, description="Matryoshka size, for models trained for it (GET /v1/models lists the sizes)"
    )
    user: str | None = Field(None, description="The end user, for the caller's own tracking (not stored)")
    input_type: str | None = Field(
        None,
        description="embedpool: query, document or one of the model's prompt names; its prompt is put before each"
        " text (default: the model's default prompt, if any)",
    )


class EmbeddingItem(BaseModel):
    object: Literal["embedding"] = "embedding"
    index: int
    embedding: list[float] | str


class Usage(BaseModel):
    prompt_tokens: int
    total_tokens: int


class EmbeddingsResponse(BaseModel):
    object: Literal["list"] = "list"
    data: list[EmbeddingItem]
    model: str
    usage: Usage
    window_counts: list[int] | None = Field(None, description="embedpool, long_inputs chunk: windows of each text")


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    dim: int
    dimensions: list[int] = Field(description="Every size `dimensions` accepts, the full one first")
    max_tokens: int
    variant: str
    device: str
    prompts: dict[str, str] = Field(description="The model's prompts by name, for `input_type`")
    default_prompt_name: str | None = None
    default: bool = Field(description="Whether requests that name no model get this one (collections too)")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]


class ErrorBody(BaseModel):
    message: str
    type: str
    param: str | None
    code: str | None


class ErrorResponse(BaseModel):
    error: ErrorBody


# Collections


class IndexOptions(_Strict):
    m: int | None = Field(None, description="HNSW m (links per node); default 16")
    ef_construction: int | None = Field(None, description="HNSW build-time candidate list; default 64")
    halfvec: bool = Field(False, description="Index float16 copies (half the index size); search reranks exactly")


class CreateCollection(_Strict):
    name: str = Field(description="1-63 of A-Z a-z 0-9 _ . -")
    index: IndexOptions | None = None
    model: str | None = Field(
        None, description="The model the collection is bound to (GET /v1/models lists them; default: the default)"
    )
    storage: Literal["float32", "float16", "binary"] = Field(
        "float32",
        description="float32: pgvector vector; float16: halfvec, half the bytes (exact rerank on the stored values);"
        " binary: bits for a Hamming index plus the float32 vectors for the exact rerank",
    )
    dimensions: int | None = Field(
        None, description="A Matryoshka size the model declares (GET /v1/models): vectors cut to it and normalised"
    )


class Collection(BaseModel):
    object: Literal["collection"] = "collection"
    name: str
    model: str
    dim: int
    metric: str
    count: int
    count_estimated: bool
    index: dict[str, Any]
    storage: str = Field(description="float32, float16 or binary")
    index_bytes: int | None = None
    table_bytes: int | None = None
    indexed: bool | None = None


class CollectionList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Collection]


class Deleted(BaseModel):
    object: Literal["collection.deleted"] = "collection.deleted"
    name: str
    deleted: bool


JsonObject = dict[str, Any]


class DocumentIn(_Strict):
    text: str
    id: str = Field("", description="Empty: derived from the text, so a resent text lands on the same row")
    metadata: JsonObject | None = None


class UpsertDocuments(LongInputFields):
    documents: list[DocumentIn]
    store_windows: bool = Field(
        False, description="With long_inputs chunk: each window a row of its own ({id}#w{k}, parent_id in metadata)"
    )
    return_vectors: bool = False
    encoding_format: Encoding = "float"


class RejectedDocument(BaseModel):
    index: int
    id: str
    reason: str


class UpsertResult(BaseModel):
    object: Literal["upsert"] = "upsert"
    ids: list[str]
    inserted: int
    updated: int
    unchanged: int
    skipped_unchanged: int
    rejected: list[RejectedDocument]
    vectors: list[list[float] | str] | None = None
    usage: Usage


class DeleteDocuments(_Strict):
    ids: list[str] | None = None
    filter: JsonObject | None = Field(None, description="Documents whose metadata contains this object")


class DeletedDocuments(BaseModel):
    object: Literal["documents.deleted"] = "documents.deleted"
    deleted: int


class SearchRequest(_Strict):
    query: str | None = Field(None, description="Text to embed and search for (or give `vector`)")
    vector: list[float] | None = Field(None, description="A query vector of the collection's dim")
    k: Annotated[int, Field(description="Number of hits")] = 10
    filter: JsonObject | None = None
    candidates: int | None = Field(None, description="HNSW candidates before the exact rerank")
    min_score: float | None = None
    include_vectors: bool = False
    encoding_format: Encoding = "float"
    input_type: str | None = Field(None, description="The prompt a text query gets (default: query)")
    best_window_per_parent: bool = Field(False, description="Of one document's window rows, only the best hit")


class SearchHit(BaseModel):
    id: str
    score: float
    text: str
    metadata: JsonObject
    vector: list[float] | str | None = None


class SearchResult(BaseModel):
    object: Literal["list"] = "list"
    data: list[SearchHit]


class Health(BaseModel):
    status: Literal["ok", "unavailable"]
    checks: dict[str, bool] = {}


class CreateSync(_Strict):
    name: str = Field(description="a-z, then a-z 0-9 _ (at most 48)")
    source: str = Field(description="schema.table, or table (schema public)")
    id_column: str = Field(description="the table's key: it becomes the document id")
    text: str = Field(description="SQL expression over the row's columns, e.g. title || ' ' || body")
    collection: str = Field(description="created if it does not exist")
    metadata_columns: list[str] = Field(default_factory=list, description="columns stored as the metadata")
    where: str = Field("", description="SQL condition: rows not matching it are kept out of the collection")
    database: str = Field("", description="a source database the server was given (--sync-databases); empty: its own")


class Sync(BaseModel):
    object: Literal["sync"] = "sync"
    name: str
    source: str
    id_column: str
    text: str
    collection: str
    metadata_columns: list[str]
    where: str
    database: str
    paused: bool
    backlog_rows: int = Field(description="rows with a change not yet embedded (dead letters not counted)")
    pending_changes: int
    lag_seconds: float = Field(description="age of the oldest pending change; 0 when caught up")
    rows_per_second: float = Field(description="rows stored or removed over the last minute, by every server")
    failures_last_minute: int
    dead_rows: int = Field(description="rows that failed every attempt; a later change of the row retries it")
    last_error: str
    last_error_row: str
    backfilled_rows: int | None = Field(None, description="on create: rows queued by the backfill")


class SyncDeleted(BaseModel):
    object: Literal["sync.deleted"] = "sync.deleted"
    name: str
    deleted: bool


class SyncList(BaseModel):
    object: Literal["list"] = "list"
    data: list[Sync]
