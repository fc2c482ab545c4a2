"""Generate the AsyncAPI 3 document from the contracts (``swarmfly contracts asyncapi``)."""

from __future__ import annotations

from typing import Any

from swarmfly.contracts import API_VERSION, error_schema, registry


def _key(name: str) -> str:
    return name.replace(".", "_").replace("{", "").replace("}", "")


def document(prefix: str = "swarmfly", version: str = "0.1.0") -> dict[str, Any]:
    """An AsyncAPI 3.0 document: one channel per subject, request/reply as operations."""
    channels: dict[str, Any] = {}
    operations: dict[str, Any] = {}
    messages: dict[str, Any] = {
        "Error": {
            "name": "Error",
            "summary": "The one error shape of every reply",
            "contentType": "application/json",
            "payload": {k: v for k, v in error_schema().items() if k not in ("$id", "examples")},
        }
    }
    for contract in registry().values():
        key = _key(contract.name)
        channel_messages: dict[str, Any] = {
            "request": {"$ref": f"#/components/messages/{key}_request"}
        }
        messages[f"{key}_request"] = {
            "name": f"{key}_request",
            "summary": contract.summary,
            "contentType": "application/json",
            "payload": contract.request,
            "examples": [{"payload": e["request"]} for e in contract.examples],
        }
        if contract.reply is not None:
            channel_messages["reply"] = {"$ref": f"#/components/messages/{key}_reply"}
            channel_messages["error"] = {"$ref": "#/components/messages/Error"}
            messages[f"{key}_reply"] = {
                "name": f"{key}_reply",
                "contentType": "application/json",
                "payload": contract.reply,
                "examples": [{"payload": e["reply"]} for e in contract.examples if "reply" in e],
            }
        channel: dict[str, Any] = {
            "address": f"{prefix}.{API_VERSION}.{contract.address}",
            "summary": contract.summary,
            "description": contract.description,
            "messages": channel_messages,
        }
        if contract.tokens:
            channel["parameters"] = {t: {"description": f"the {t} token"} for t in contract.tokens}
        if contract.sender:
            channel.setdefault("parameters", {}).update(
                sender_type={"description": "the sending host's type: seed for storage only"},
                sender={"description": "the sending host's id: it may publish under no other"},
            )
        channels[key] = channel
        operation: dict[str, Any] = {
            "action": "receive",
            "channel": {"$ref": f"#/channels/{key}"},
            "summary": contract.summary,
            "messages": [{"$ref": f"#/channels/{key}/messages/request"}],
            "x-swarmfly-service": contract.service,
            "x-swarmfly-version": contract.version,
        }
        if contract.fanout:
            operation["x-swarmfly-fanout"] = True
        if contract.reply is not None:
            operation["reply"] = {
                "channel": {"$ref": f"#/channels/{key}"},
                "messages": [
                    {"$ref": f"#/channels/{key}/messages/reply"},
                    {"$ref": f"#/channels/{key}/messages/error"},
                ],
            }
        operations[key] = operation
    return {
        "asyncapi": "3.0.0",
        "info": {
            "title": "swarmfly control plane",
            "version": version,
            "description": "NATS subjects of swarmfly; piece bytes travel peer to peer over HTTP.",
        },
        "defaultContentType": "application/json",
        "servers": {"nats": {"host": "localhost:4222", "protocol": "nats"}},
        "channels": channels,
        "operations": operations,
        "components": {"messages": messages},
    }
