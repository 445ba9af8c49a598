#!/usr/bin/env python3
"""Writes the seed corpus of every fuzz target from the committed test vectors.

Run from fuzz/: python3 seed_corpus.py (then RUSTC_BOOTSTRAP=1 cargo fuzz run TARGET).
"""
import json
import pathlib

here = pathlib.Path(__file__).parent
vectors = json.loads((here / "../crates/keycast-core/tests/vectors/wire-v2.json").read_text())["vectors"]


def write(target, name, data):
    folder = here / "corpus" / target
    folder.mkdir(parents=True, exist_ok=True)
    (folder / name).write_bytes(data)


packets = []
for i, v in enumerate(vectors):
    data = bytes.fromhex(v["hex"])
    write("decode_message", f"vector-{i:02}", data)
    if v["decoded"] and "rekey" in v["decoded"]:
        write("verify_rekey_packet", f"vector-{i:02}", data)
        if v["verify"] == "ok":
            packets.append(data)
    if v["decoded"] and "heartbeat" in v["decoded"]:
        write("verify_heartbeat", f"vector-{i:02}", data)
framed = b"".join(len(p).to_bytes(2, "big") + p for p in packets)
write("reassemble_rekey", "all-packets", framed)
write("reassemble_rekey", "reversed", b"".join(len(p).to_bytes(2, "big") + p for p in reversed(packets)))
# import_snapshot: a first byte >= 0x80 builds a real graph (config = byte % 8, then a member
# count) and applies (offset u16, xor u8) edits; one seed per config, unedited and edited.
for selector in range(0x80, 0x88):
    write("import_snapshot", f"graph-{selector:02x}", bytes([selector, 40]))
    write("import_snapshot", f"edited-{selector:02x}", bytes([selector, 40, 0, 9, 1, 0, 30, 0x80]))
# verify_merge_notice: a well-formed notice (right side, IPv4 then IPv6 addresses, server
# name "localhost"; the signature does not verify) and a split.
def name(text):
    return bytes([len(text)]) + text
def merge_notice(move, multicast):
    body = bytes([2, 19]) + (0x6B63).to_bytes(8, "big") + (7).to_bytes(8, "big") + bytes([move]) + (1 << 32).to_bytes(8, "big") + (0x6B64).to_bytes(8, "big") + (12).to_bytes(8, "big") + (40).to_bytes(8, "big")
    return body + bytes(range(32)) + bytes([4, 127, 0, 0, 1]) + (7400).to_bytes(2, "big") + name(b"localhost") + multicast + bytes(64)
write("verify_merge_notice", "right", merge_notice(2, bytes([4, 239, 1, 2, 3]) + (7401).to_bytes(2, "big")))
write("verify_merge_notice", "split-v6", merge_notice(0, bytes([6]) + bytes(15) + bytes([1]) + (7401).to_bytes(2, "big")))
# decode_handback: participant 0b10 of 2 and of 16 ID bits hands over its TEK and KEKs.
def handback(id_bits, pid):
    key = lambda kid: kid.to_bytes(4, "big") + (3).to_bytes(4, "big") + (1).to_bytes(4, "big") + bytes([kid % 256]) * 32
    keks = b"".join(key(1 + 2 * i + ((pid >> i) & 1)) for i in range(id_bits))
    return bytes([2, 0x3C]) + (1).to_bytes(8, "big") + pid.to_bytes(8, "big") + key(0) + bytes([id_bits]) + keks
write("decode_handback", "two-bits", handback(2, 0b10))
write("decode_handback", "sixteen-bits", handback(16, 0xBEEF))

# decode_appointment: the controller at 127.0.0.1:7400 proving "localhost", rekeys to 239.255.0.1:7401.
appointment = bytes([2, 0x3D]) + (1).to_bytes(8, "big") + bytes([127, 0, 0, 1]) + (7400).to_bytes(2, "big") + bytes([9]) + b"localhost" + bytes([239, 255, 0, 1]) + (7401).to_bytes(2, "big")
write("decode_appointment", "loopback", appointment)
# import_merge: the first byte selects. Below 0x40: raw bytes, seeded with a merge record (two
# members, one pending leave, a short graph), the same as a merge side, and a ticket. 0x40 and
# up: a real handback (then a right member count) or, from 0x80, a real merged group (degree
# 2 + byte % 4, then left and right member counts), each unedited and edited.
def u64(n):
    return n.to_bytes(8, "big")
right_group = u64(2) + bytes([1]) + (2).to_bytes(4, "big") + bytes([0]) + u64(100) + bytes(range(32)) + u64(5) + u64(3) + u64(4)
right_address = bytes([4, 127, 0, 0, 1]) + (7000).to_bytes(2, "big")
right_multicast = bytes([4, 239, 255, 0, 9]) + (7001).to_bytes(2, "big")
old_right_group = right_group + right_address + right_multicast
right_group += right_address + name(b"right.keycast.test") + right_multicast
members = (2).to_bytes(4, "big") + u64(1) + (1).to_bytes(2, "big") + b"a" + u64(2) + (1).to_bytes(2, "big") + b"b"
pending = (1).to_bytes(4, "big") + bytes([0]) + u64(2)
side = right_group + members + pending + u64(3) + b"abc"
old_side = old_right_group + members + pending + u64(3) + b"abc"
# Format 2 (with server names); a merge record of format 1 (before them) still reads.
write("import_merge", "record", bytes([0, 2]) + u64(4) + u64(9) + u64(7) + bytes(32) + side)
write("import_merge", "record-format-1", bytes([0, 1]) + u64(4) + u64(9) + u64(7) + bytes(32) + old_side)
write("import_merge", "side", bytes([0, 2]) + side)
ticket = u64(1) + bytes(range(32)) + bytes([4, 127, 0, 0, 1]) + (7100).to_bytes(2, "big") + name(b"left.keycast.test") + bytes([4, 239, 255, 0, 8]) + (7101).to_bytes(2, "big")
ticket += u64(9) + u64(4) + u64(7) + u64(3) + (1).to_bytes(4, "big") + (3).to_bytes(4, "big") + b"pkt"
write("import_merge", "ticket", bytes([0, 2]) + ticket)
write("import_merge", "handback", bytes([0x40, 7]))
write("import_merge", "handback-edited", bytes([0x40, 7, 0, 90, 1, 0, 200, 0x80]))
for selector in range(0x80, 0x84):
    write("import_merge", f"merged-{selector:02x}", bytes([selector, 9, 5]))
    write("import_merge", f"edited-{selector:02x}", bytes([selector, 9, 5, 0, 9, 1, 0, 60, 0x80]))
print("seed corpus written under", here / "corpus")
