"""Who may talk to the cloud: addresses, TLS credentials, edge tokens and the identities they prove."""
from __future__ import annotations

from pipeline.trust.addresses import TrustError, is_loopback, parse_address, peer_host
from pipeline.trust.credentials import channel_credentials, server_credentials
from pipeline.trust.edges import LOCAL_IDENTITY, EdgeEntry, EdgeRegistry, caller_identity, edges_line, load_edges, parse_edges
from pipeline.trust.tokens import TOKEN_BYTES, new_token, token_call_credentials, token_channel, token_hash

__all__ = [
    "LOCAL_IDENTITY",
    "TOKEN_BYTES",
    "EdgeEntry",
    "EdgeRegistry",
    "TrustError",
    "caller_identity",
    "channel_credentials",
    "edges_line",
    "is_loopback",
    "load_edges",
    "new_token",
    "parse_address",
    "parse_edges",
    "peer_host",
    "server_credentials",
    "token_call_credentials",
    "token_channel",
    "token_hash",
]
