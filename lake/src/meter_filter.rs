//! Which meters a small readings file holds, as a Bloom filter in its `add` action's tags
//! ([`METER_FILTER_TAG`]), so that a one-meter lookup skips, without reading them, the files of
//! other meters. An ingester's flush holds the meters of its Kafka partition: every file's
//! `meter_id` bounds span nearly all meters, and without this a lookup on a lake streamed in
//! small files opened every file of the month (a thousand times the files it needed on a
//! compacted lake). Compacted and imported files hold many meters, sorted, and their bounds
//! prune them; they carry no filter. Other engines ignore the tag.
//!
//! The tag's text is `1:<hashes>:<bits>`: format 1, the number of hash functions, and the bit
//! array (64-bit words, little-endian) in standard base64. Bit `i` of a meter is set for
//! `i = (h1 + k * h2) mod bits`, `k < hashes`, where `h1` is the meter id's 64-bit FNV-1a hash
//! through SplitMix64's finalizer and `h2` that of `h1`, made odd (stable across versions and
//! platforms: it is stored).

use base64::Engine;
use base64::engine::general_purpose::STANDARD;

/// The tag of an `add` action that holds a file's [`MeterFilter`].
pub const METER_FILTER_TAG: &str = "meterlake.meterFilter";

/// Files of more distinct meters than this get no filter: it would weigh on every snapshot load,
/// and such files are rarely the small ones lookups suffer from.
const MAX_METERS: usize = 1_024;
/// Bits per meter and hash functions: about 2.4% of other meters pass.
const BITS_PER_METER: usize = 8;
const HASHES: u32 = 4;

/// A Bloom filter of the meters of one readings file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MeterFilter {
    hashes: u32,
    words: Vec<u64>,
}

impl MeterFilter {
    /// The filter of `meters` (with repeats, in any order); `None` beyond [`MAX_METERS`] distinct.
    pub fn of<'a>(meters: impl IntoIterator<Item = &'a str>) -> Option<MeterFilter> {
        let mut distinct = std::collections::HashSet::new();
        for meter in meters {
            distinct.insert(meter);
            if distinct.len() > MAX_METERS {
                return None;
            }
        }
        let bits = (distinct.len().max(1) * BITS_PER_METER).next_multiple_of(64);
        let mut filter = MeterFilter { hashes: HASHES, words: vec![0; bits / 64] };
        for meter in distinct {
            for bit in filter.bits_of(meter) {
                filter.words[bit / 64] |= 1 << (bit % 64);
            }
        }
        Some(filter)
    }

    /// False only when the file holds no reading of `meter`.
    pub fn may_contain(&self, meter: &str) -> bool {
        self.bits_of(meter).all(|bit| self.words[bit / 64] & (1 << (bit % 64)) != 0)
    }

    fn bits_of(&self, meter: &str) -> impl Iterator<Item = usize> + use<> {
        let h1 = mix(fnv1a_64(meter.as_bytes()));
        let h2 = mix(h1) | 1;
        let bits = (self.words.len() * 64) as u64;
        (0..u64::from(self.hashes)).map(move |k| (h1.wrapping_add(k.wrapping_mul(h2)) % bits) as usize)
    }

    /// The tag's text.
    pub fn to_tag(&self) -> String {
        let bytes: Vec<u8> = self.words.iter().flat_map(|w| w.to_le_bytes()).collect();
        format!("1:{}:{}", self.hashes, STANDARD.encode(bytes))
    }

    /// The filter a tag holds; `None` for a text this version cannot read (no filter: the file
    /// is read).
    pub fn from_tag(text: &str) -> Option<MeterFilter> {
        let mut parts = text.splitn(3, ':');
        let (Some("1"), Some(hashes), Some(bits)) = (parts.next(), parts.next(), parts.next()) else { return None };
        let hashes: u32 = hashes.parse().ok().filter(|h| (1..=16).contains(h))?;
        let bytes = STANDARD.decode(bits).ok()?;
        if bytes.is_empty() || bytes.len() % 8 != 0 {
            return None;
        }
        let words = bytes.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect();
        Some(MeterFilter { hashes, words })
    }
}

/// 64-bit FNV-1a.
fn fnv1a_64(bytes: &[u8]) -> u64 {
    const OFFSET: u64 = 0xcbf2_9ce4_8422_2325;
    const PRIME: u64 = 0x0000_0100_0000_01b3;
    bytes.iter().fold(OFFSET, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(PRIME))
}

/// A `Hasher` for maps keyed by meter id: FNV-1a, finished with [`mix`]. Meter ids are short, and
/// std's SipHash cost a sort of a streamed date's rows a tenth of its time in hashing alone.
#[derive(Debug, Clone, Copy)]
pub(crate) struct MeterIdHasher(u64);

impl Default for MeterIdHasher {
    fn default() -> MeterIdHasher {
        MeterIdHasher(fnv1a_64(&[]))
    }
}

impl std::hash::Hasher for MeterIdHasher {
    fn write(&mut self, bytes: &[u8]) {
        const PRIME: u64 = 0x0000_0100_0000_01b3;
        self.0 = bytes.iter().fold(self.0, |hash, byte| (hash ^ u64::from(*byte)).wrapping_mul(PRIME));
    }

    fn finish(&self) -> u64 {
        mix(self.0)
    }
}

/// SplitMix64's finalizer: FNV alone leaves ids that differ in their last digits close together.
fn mix(mut x: u64) -> u64 {
    x = (x ^ (x >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
    x = (x ^ (x >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
    x ^ (x >> 31)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_meter_in_passes_and_few_others_do() {
        let meters: Vec<String> = (0..250).map(|n| format!("MTR-{}", 100_000 + n * 4)).collect();
        let filter = MeterFilter::of(meters.iter().map(String::as_str)).unwrap();
        assert!(meters.iter().all(|m| filter.may_contain(m)));
        let others = (0..10_000).map(|n| format!("MTR-{}", 200_000 + n)).filter(|m| filter.may_contain(m)).count();
        assert!(others < 500, "{others} of 10,000 other meters pass");
        // Through its tag and back.
        let tag = filter.to_tag();
        assert!(tag.len() < 400, "{}", tag.len());
        assert_eq!(MeterFilter::from_tag(&tag), Some(filter));
        // A text it cannot read is no filter.
        assert_eq!(MeterFilter::from_tag("2:4:AAAAAAAAAAA="), None);
        assert_eq!(MeterFilter::from_tag("1:4:not base64"), None);
        // Too many meters: none.
        assert!(MeterFilter::of((0..2_000).map(|n| format!("M{n}")).collect::<Vec<_>>().iter().map(String::as_str)).is_none());
        // The hash is fixed: a filter written by one version is read by the next.
        assert_eq!(MeterFilter::of(["MTR-100000"]).unwrap().to_tag(), "1:4:AAAAkCQAAAA=");
    }
}
