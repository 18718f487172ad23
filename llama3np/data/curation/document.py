"""The document record every stage passes along: what datatrove calls a Document."""
from dataclasses import dataclass, field


@dataclass
class Document:
    """One document: `id` unique in the run, `text`, where it came from, and free-form metadata.

    `metadata` collects what the stages learn (scores, cluster ids); a removed document gets
    `metadata["removed_by"]` (the stage) and `metadata["reason"]` (datatrove's reason string).
    """
    id: str
    text: str
    source: str = ""  # the input file (and line) it was read from
    url: str = ""  # for web pages; used by URL dedup
    metadata: dict = field(default_factory=dict)

    def to_json(self):
        d = {"id": self.id, "text": self.text}
        if self.source:
            d["source"] = self.source
        if self.url:
            d["url"] = self.url
        if self.metadata:
            d["metadata"] = self.metadata
        return d

    @classmethod
    def from_json(cls, d):
        return cls(id=str(d["id"]), text=d["text"], source=d.get("source", ""), url=d.get("url", ""),
                   metadata=dict(d.get("metadata") or {}))
