#!/bin/sh
# Runs every fuzz target for SECONDS (default 600) each, one after another, from seeds.
set -e
cd "$(dirname "$0")"
python3 seed_corpus.py
for target in decode_message verify_rekey_packet verify_heartbeat reassemble_rekey import_snapshot decode_distributed_flat verify_merge_notice decode_handback decode_appointment import_merge verify_scheme_switch; do
    RUSTC_BOOTSTRAP=1 cargo fuzz run "$target" -- -max_total_time="${1:-600}" -max_len=4096 2>&1 | tee "fuzz-$target.log" | grep -E "Done|ERROR|panicked" || true
done
