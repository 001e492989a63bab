"""The transport-free service core that every door calls (see ARCHITECTURE.md)."""

from embedpool.service.core import EmbeddingService, IngestBatch
from embedpool.service.documents import Document, Embedded, Hit, Rejected, WriteOutcome
from embedpool.service.limits import Limits

__all__ = ["Document", "Embedded", "EmbeddingService", "Hit", "IngestBatch", "Limits", "Rejected", "WriteOutcome"]
