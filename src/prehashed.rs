//! A hasher for keys that are hashes already (the pulled set's slots, the order of
//! batches in flight): hashing them again would only cost time.

use std::hash::Hasher;

/// The keys are already hashes: hashing them again would only cost time.
#[derive(Default)]
pub struct Prehashed(u64);

impl Hasher for Prehashed {
    fn finish(&self) -> u64 {
        self.0
    }
    fn write(&mut self, bytes: &[u8]) {
        for &b in bytes {
            self.0 = self.0.rotate_left(8) ^ u64::from(b);
        }
    }
    fn write_u64(&mut self, n: u64) {
        self.0 = n;
    }
    /// A shard's 32-bit tags: spread over all 64 bits (Fibonacci hashing), because the hash
    /// table takes its control byte from the top seven bits, which a tag alone leaves zero.
    fn write_u32(&mut self, n: u32) {
        self.0 = u64::from(n).wrapping_mul(0x9E37_79B9_7F4A_7C15);
    }
}
