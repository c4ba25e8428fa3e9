"""The committed stubs in blockpilot/v1 are exactly what `make protos` generates from protos/."""

from __future__ import annotations

from pathlib import Path

from blockpilot.protogen import PROTO_ROOT, ROOT, generate


def test_committed_stubs_are_fresh(tmp_path):
    generated = generate(tmp_path)
    assert generated, "protoc produced nothing"
    for path in generated:
        committed = ROOT / path.relative_to(tmp_path)
        assert committed.exists(), f"{committed} is missing: run `make protos`"
        assert committed.read_bytes() == path.read_bytes(), f"{committed} is stale: run `make protos`"
    stale = {p.name for p in (ROOT / "blockpilot" / "v1").glob("*_pb2*.py*")} - {p.name for p in generated}
    assert not stale, f"stubs without a proto: {stale}"


def test_every_message_field_and_enum_value_is_documented():
    """Each message, field, enum value, service and rpc in the protos has a comment above it."""
    for proto in sorted((PROTO_ROOT / "blockpilot" / "v1").glob("*.proto")):
        lines = proto.read_text().splitlines()
        for number, line in enumerate(lines):
            code = line.strip()
            declares = code.startswith(("message ", "enum ", "service ", "rpc ", "oneof ")) or (
                code.endswith(";") and "=" in code and not code.startswith(("syntax", "package", "import", "option")))
            if declares:
                previous = lines[number - 1].strip()
                assert previous.startswith("//"), f"{proto.name}:{number + 1} undocumented: {code}"
        for enum_start in [i for i, l in enumerate(lines) if l.strip().startswith("enum ")]:
            first_value = next(l for l in lines[enum_start + 1:] if "=" in l)
            assert "_UNSPECIFIED = 0" in first_value, f"{proto.name}: enum without a zero *_UNSPECIFIED"
