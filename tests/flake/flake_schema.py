"""Validation of a VmConfig against cloud-hypervisor's OpenAPI description.

The OpenAPI schemas do not forbid unknown keys (no ``additionalProperties:
false``), so a misspelt key would pass plain schema validation and be
silently ignored by cloud-hypervisor. ``problems`` therefore also walks the
config and reports every key the schema does not declare.
"""

from __future__ import annotations

from typing import Any

from openapi_schema_validator import OAS30Validator


def _resolve(schema: dict[str, Any], root: dict[str, Any]) -> dict[str, Any]:
    while "$ref" in schema:
        ref = schema["$ref"]
        assert ref.startswith("#/"), ref
        node: Any = root
        for part in ref[2:].split("/"):
            node = node[part]
        schema = node
    return schema


def _unknown_keys(
    value: Any, schema: dict[str, Any], root: dict[str, Any], where: str
) -> list[str]:
    schema = _resolve(schema, root)
    found: list[str] = []
    if isinstance(value, dict) and "properties" in schema:
        for key, item in value.items():
            if key not in schema["properties"]:
                found.append(f"{where}.{key}: not a key of this schema")
            else:
                found += _unknown_keys(item, schema["properties"][key], root, f"{where}.{key}")
    elif isinstance(value, list) and "items" in schema:
        for index, item in enumerate(value):
            found += _unknown_keys(item, schema["items"], root, f"{where}[{index}]")
    return found


def problems(config: Any, schema: dict[str, Any]) -> list[str]:
    """Every schema violation and unknown key in ``config`` (empty: valid)."""
    validator = OAS30Validator(schema)
    found = [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(config)
    ]
    return found + _unknown_keys(config, schema, schema, "VmConfig")
