"""What `ewq serve` takes: how a plan runs across machines."""

from __future__ import annotations

from pydantic import Field

from ewq.config._base import Config

__all__ = ["ServeConfig"]


class ServeConfig(Config):
    """How `ewq serve` runs a plan: the workers, the context, what it answers."""

    rpc: str | None = Field(
        None,
        description="Workers' host:port in pipeline order, comma-separated (default: "
        "the hosts of the plan's cluster file).",
    )
    ctx: int | None = Field(
        None,
        ge=16,
        description="Context length (tokens; default: what the plan sized for).",
    )
    threads: int | None = Field(None, ge=1, description="CPU threads.")
    prompt: str | None = Field(
        None, description="Complete this text greedily, print it and stop."
    )
    max_tokens: int = Field(64, ge=1, description="Tokens to generate.")
    repack: bool = Field(
        True,
        description="Repack weights for faster CPU kernels here (llama-server's "
        "default; --no-repack runs the workers' kernels, for results equal to theirs).",
    )
    host: str = Field("127.0.0.1", description="HTTP address to serve on.")
    port: int = Field(8080, ge=1, le=65535, description="HTTP port.")
    rpc_timeout: float = Field(
        60.0,
        ge=1,
        description="Seconds without progress (a tensor sent, a token generated) "
        "after which a silent worker is an error naming it.",
    )

    def endpoints(self) -> list[str] | None:
        """The workers named by --rpc, in pipeline order."""
        return (
            [e.strip() for e in self.rpc.split(",") if e.strip()] if self.rpc else None
        )
