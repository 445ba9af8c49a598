//! Bounded reading and writing of the primitive fields (big-endian integers, key refs,
//! fixed arrays). Every read checks the remaining length first and names the field it was
//! reading, so a short or malformed message yields a typed error and never a panic.

use crate::graph::{MemberId, Position};
use crate::key::{Key, KeyRef, KEY_LEN};
use crate::wrap::{NonceSalt, Wrap, Wrapper, SEALED_LEN};

use super::{DecodeError, GroupId};

/// A cursor over untrusted bytes.
pub(crate) struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl<'a> Reader<'a> {
    pub(crate) fn new(bytes: &'a [u8]) -> Self {
        Reader { bytes, pos: 0 }
    }

    pub(crate) fn remaining(&self) -> usize {
        self.bytes.len() - self.pos
    }

    pub(crate) fn take(&mut self, len: usize, field: &'static str) -> Result<&'a [u8], DecodeError> {
        if len > self.remaining() {
            return Err(DecodeError::Truncated { field, needed: len, available: self.remaining() });
        }
        let out = &self.bytes[self.pos..self.pos + len];
        self.pos += len;
        Ok(out)
    }

    pub(crate) fn array<const N: usize>(&mut self, field: &'static str) -> Result<[u8; N], DecodeError> {
        let mut out = [0u8; N];
        out.copy_from_slice(self.take(N, field)?);
        Ok(out)
    }

    pub(crate) fn u8(&mut self, field: &'static str) -> Result<u8, DecodeError> {
        Ok(self.array::<1>(field)?[0])
    }

    pub(crate) fn u16(&mut self, field: &'static str) -> Result<u16, DecodeError> {
        Ok(u16::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u32(&mut self, field: &'static str) -> Result<u32, DecodeError> {
        Ok(u32::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn u64(&mut self, field: &'static str) -> Result<u64, DecodeError> {
        Ok(u64::from_be_bytes(self.array(field)?))
    }

    pub(crate) fn group(&mut self) -> Result<GroupId, DecodeError> {
        Ok(GroupId(self.u64("group")?))
    }

    pub(crate) fn member(&mut self) -> Result<MemberId, DecodeError> {
        Ok(MemberId(self.u64("member")?))
    }

    pub(crate) fn key_ref(&mut self, field: &'static str) -> Result<KeyRef, DecodeError> {
        Ok(KeyRef::from_bytes(self.array(field)?))
    }

    pub(crate) fn key(&mut self, field: &'static str) -> Result<Key, DecodeError> {
        Ok(Key::from_bytes(self.array::<KEY_LEN>(field)?))
    }

    /// A boolean flag byte: exactly 0 or 1.
    pub(crate) fn flag(&mut self, field: &'static str) -> Result<bool, DecodeError> {
        match self.u8(field)? {
            0 => Ok(false),
            1 => Ok(true),
            value => Err(DecodeError::BadValue { field, value: value.into() }),
        }
    }

    /// A count of items of at least `min_item_len` bytes each, checked against both `max` and
    /// the bytes left, before the caller allocates anything for them.
    pub(crate) fn count(
        &mut self,
        len: usize,
        max: usize,
        min_item_len: usize,
        field: &'static str,
    ) -> Result<usize, DecodeError> {
        let count = match len {
            1 => self.u8(field)? as usize,
            2 => self.u16(field)? as usize,
            _ => self.u32(field)? as usize,
        };
        if count > max {
            return Err(DecodeError::TooLong { field, len: count, max });
        }
        let needed = count.saturating_mul(min_item_len);
        if needed > self.remaining() {
            return Err(DecodeError::Truncated { field, needed, available: self.remaining() });
        }
        Ok(count)
    }

    /// A wrap of a rekey whose nonce salt is `salt`.
    pub(crate) fn wrap(&mut self, salt: &NonceSalt) -> Result<Wrap, DecodeError> {
        let key = self.key_ref("wrapped key")?;
        let under = match self.u8("wrapper kind")? {
            0 => Wrapper::Key(self.key_ref("wrapper")?),
            1 => Wrapper::KekAndTek { kek: self.key_ref("wrapper kek")?, tek: self.key_ref("wrapper tek")? },
            value => return Err(DecodeError::BadValue { field: "wrapper kind", value: value.into() }),
        };
        let sealed = self.array::<SEALED_LEN>("sealed key")?;
        Ok(Wrap { key, under, sealed, salt: *salt })
    }

    pub(crate) fn member_position(&mut self) -> Result<Position, DecodeError> {
        match self.u8("position kind")? {
            0 => {
                let leaf = self.u32("leaf")?;
                let degree = self.u32("degree")?;
                if degree < 2 {
                    return Err(DecodeError::BadValue { field: "degree", value: degree.into() });
                }
                Ok(Position::Tree { leaf, degree })
            }
            1 => {
                let id = self.u64("flat id")?;
                let id_bits = self.u8("id bits")?;
                if !(1..=64).contains(&id_bits) {
                    return Err(DecodeError::BadValue { field: "id bits", value: id_bits.into() });
                }
                if id_bits < 64 && id >> id_bits != 0 {
                    return Err(DecodeError::BadValue { field: "flat id", value: id });
                }
                Ok(Position::Flat { id, id_bits })
            }
            value => Err(DecodeError::BadValue { field: "position kind", value: value.into() }),
        }
    }

    /// Succeeds only if every byte was consumed.
    pub(crate) fn finish(self) -> Result<(), DecodeError> {
        match self.remaining() {
            0 => Ok(()),
            extra => Err(DecodeError::TrailingBytes(extra)),
        }
    }
}

/// Appends canonical encodings to a byte vector.
pub(crate) trait Writer {
    fn put_u8(&mut self, v: u8);
    fn put_u16(&mut self, v: u16);
    fn put_u32(&mut self, v: u32);
    fn put_u64(&mut self, v: u64);
    fn put_ref(&mut self, r: KeyRef);
    fn put_wrap(&mut self, w: &Wrap);
    fn put_position(&mut self, p: Position);
}

impl Writer for Vec<u8> {
    fn put_u8(&mut self, v: u8) {
        self.push(v);
    }
    fn put_u16(&mut self, v: u16) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u32(&mut self, v: u32) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_u64(&mut self, v: u64) {
        self.extend_from_slice(&v.to_be_bytes());
    }
    fn put_ref(&mut self, r: KeyRef) {
        self.extend_from_slice(&r.to_bytes());
    }
    fn put_wrap(&mut self, w: &Wrap) {
        // One copy per wrap: rekeys place hundreds of thousands of them.
        const R: usize = KeyRef::ENCODED_LEN;
        let mut bytes = [0u8; R + 1 + 2 * R + SEALED_LEN];
        bytes[..R].copy_from_slice(&w.key.to_bytes());
        let len = R + w.under.write_to(&mut bytes[R..]);
        bytes[len..len + SEALED_LEN].copy_from_slice(&w.sealed);
        self.extend_from_slice(&bytes[..len + SEALED_LEN]);
    }
    fn put_position(&mut self, p: Position) {
        match p {
            Position::Tree { leaf, degree } => {
                self.put_u8(0);
                self.put_u32(leaf);
                self.put_u32(degree);
            }
            Position::Flat { id, id_bits } => {
                self.put_u8(1);
                self.put_u64(id);
                self.put_u8(id_bits);
            }
        }
    }
}

/// Smallest encoding of a wrap (under one key).
pub(crate) const MIN_WRAP_LEN: usize = KeyRef::ENCODED_LEN + 1 + KeyRef::ENCODED_LEN + SEALED_LEN;
