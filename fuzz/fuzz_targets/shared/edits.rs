/// `bytes` with (offset u16, xor u8) edits applied (a 0 xor truncates): structured inputs
/// damaged the way a fuzzer would, from a real encoding.
pub fn edited(mut bytes: Vec<u8>, edits: &[u8]) -> Vec<u8> {
    for edit in edits.chunks_exact(3) {
        let at = usize::from(u16::from_be_bytes([edit[0], edit[1]]));
        match bytes.len() {
            0 => break,
            len if edit[2] == 0 => bytes.truncate(at % len),
            len => bytes[at % len] ^= edit[2],
        }
    }
    bytes
}
