//! The frame format: encoding and decoding over byte slices, with no I/O.
//!
//! Async code only fills and drains buffers; every decision about bytes is made here, in
//! synchronous code that a fuzzer or a unit test can drive directly (like mini-redis's
//! `frame.rs`). Not the handshake message (see [`crate::handshake`]), which travels inside a
//! frame.
//!
//! # Format
//!
//! ```text
//! +----------------+--------+----------------------+
//! | length: u32 BE | flags  | payload (length B)   |
//! +----------------+--------+----------------------+
//! ```
//!
//! `length` counts the payload bytes on the wire, after the flag byte. Flag bit 0 means the
//! payload is one or more zstd frames; every other bit is reserved and must be zero. The encoder
//! compresses payloads of at least [`FrameLimits::compression_bytes_min`] bytes and keeps the
//! compressed form only when it is smaller.
//!
//! # Limits
//!
//! [`FrameLimits::frame_bytes_max`] bounds both the wire length (checked from the header alone,
//! before the payload is buffered) and the decompressed size (decompression stops one byte past
//! the limit, and the zstd window is capped to the limit, so a small bomb cannot allocate more).

use std::io::Read;

use bytes::{Buf, Bytes, BytesMut};

/// Bytes before the payload: the length and the flag byte.
pub const FRAME_HEADER_BYTES: usize = 5;
/// Flag bit 0: the payload is zstd-compressed.
pub const FLAG_COMPRESSED: u8 = 0b0000_0001;
/// Default for [`FrameLimits::frame_bytes_max`]: 16 MiB.
pub const FRAME_BYTES_MAX_DEFAULT: usize = 16 * 1024 * 1024;
/// Default for [`FrameLimits::compression_bytes_min`]: 4 KiB.
pub const COMPRESSION_BYTES_MIN_DEFAULT: usize = 4 * 1024;
/// The zstd level: the library's default, a good speed/size trade for deltas.
const COMPRESSION_LEVEL: i32 = 3;
/// How much the decompressor produces per read.
const DECOMPRESSION_CHUNK_BYTES: usize = 64 * 1024;

/// The bounds one side applies to the frames it sends and accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameLimits {
    /// The largest payload, both on the wire and decompressed. At most `u32::MAX`.
    pub frame_bytes_max: usize,
    /// Payloads at least this large are offered to zstd.
    pub compression_bytes_min: usize,
}

impl Default for FrameLimits {
    fn default() -> FrameLimits {
        FrameLimits { frame_bytes_max: FRAME_BYTES_MAX_DEFAULT, compression_bytes_min: COMPRESSION_BYTES_MIN_DEFAULT }
    }
}

/// Why a frame could not be encoded. Nothing was appended to the output.
#[derive(Debug, thiserror::Error)]
pub enum EncodeError {
    /// The payload is larger than `frame_bytes_max`.
    #[error("the payload has {bytes} bytes, more than the {bytes_max}-byte frame limit")]
    TooLarge { bytes: usize, bytes_max: usize },
    /// zstd failed (it does not for valid input; kept as a value rather than a panic).
    #[error("compression failed: {0}")]
    Compress(std::io::Error),
}

/// Why bytes from a peer are not a frame. The peer is disconnected; the buffer is left as it
/// was.
#[derive(Clone, Debug, PartialEq, Eq, thiserror::Error)]
pub enum DecodeError {
    /// The header announces more payload than `frame_bytes_max`.
    #[error("the frame announces {bytes} bytes, more than the {bytes_max}-byte limit")]
    TooLarge { bytes: usize, bytes_max: usize },
    /// A reserved flag bit is set.
    #[error("unknown frame flags {0:#010b}")]
    UnknownFlags(u8),
    /// The compressed payload decompresses to more than `frame_bytes_max`.
    #[error("the compressed payload decompresses to more than the {bytes_max}-byte limit")]
    DecompressedTooLarge { bytes_max: usize },
    /// The compressed payload is not valid zstd.
    #[error("the compressed payload is not valid zstd: {0}")]
    Corrupt(String),
}

/// A parsed header: the flags and the payload's length on the wire.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FrameHeader {
    /// Flag bits; only [`FLAG_COMPRESSED`] may be set.
    pub flags: u8,
    /// Payload bytes following the header.
    pub length: usize,
}

impl FrameHeader {
    /// Parses the header at the start of `buffer`: `Ok(None)` if fewer than
    /// [`FRAME_HEADER_BYTES`] bytes are there yet. Checks the length against the limit before
    /// any payload is buffered.
    pub fn parse(buffer: &[u8], limits: &FrameLimits) -> Result<Option<FrameHeader>, DecodeError> {
        let Some(header) = buffer.get(..FRAME_HEADER_BYTES) else {
            return Ok(None);
        };
        let length = u32::from_be_bytes([header[0], header[1], header[2], header[3]]) as usize;
        let flags = header[4];
        if length > limits.frame_bytes_max {
            return Err(DecodeError::TooLarge { bytes: length, bytes_max: limits.frame_bytes_max });
        }
        if flags & !FLAG_COMPRESSED != 0 {
            return Err(DecodeError::UnknownFlags(flags));
        }
        Ok(Some(FrameHeader { flags, length }))
    }

    /// The whole frame's size: header plus payload.
    pub fn frame_bytes(&self) -> usize {
        FRAME_HEADER_BYTES + self.length
    }
}

/// Appends one frame carrying `payload` to `output`.
pub fn encode(payload: &[u8], limits: &FrameLimits, output: &mut Vec<u8>) -> Result<(), EncodeError> {
    let too_large = || EncodeError::TooLarge { bytes: payload.len(), bytes_max: limits.frame_bytes_max };
    if payload.len() > limits.frame_bytes_max {
        return Err(too_large());
    }
    if payload.len() >= limits.compression_bytes_min && !payload.is_empty() {
        let compressed = zstd::bulk::compress(payload, COMPRESSION_LEVEL).map_err(EncodeError::Compress)?;
        if compressed.len() < payload.len() {
            return append(&compressed, FLAG_COMPRESSED, output).map_err(|()| too_large());
        }
    }
    append(payload, 0, output).map_err(|()| too_large())
}

fn append(payload: &[u8], flags: u8, output: &mut Vec<u8>) -> Result<(), ()> {
    let length = u32::try_from(payload.len()).map_err(|_| ())?;
    output.reserve(FRAME_HEADER_BYTES + payload.len());
    output.extend_from_slice(&length.to_be_bytes());
    output.push(flags);
    output.extend_from_slice(payload);
    Ok(())
}

/// Takes one whole frame off the front of `buffer` and returns its (decompressed) payload.
///
/// `Ok(None)`: the frame is not complete yet; nothing was taken, and the caller reads more.
/// `Err`: the bytes are not a valid frame; nothing was taken, and the caller disconnects.
pub fn decode(buffer: &mut BytesMut, limits: &FrameLimits) -> Result<Option<Bytes>, DecodeError> {
    let Some(header) = FrameHeader::parse(buffer, limits)? else {
        return Ok(None);
    };
    if buffer.len() < header.frame_bytes() {
        // No reservation for the announced length: the buffer grows only with bytes that
        // actually arrive, so a header that promises 16 MiB costs nothing by itself.
        return Ok(None);
    }
    let payload = &buffer[FRAME_HEADER_BYTES..header.frame_bytes()];
    if header.flags & FLAG_COMPRESSED != 0 {
        let decompressed = decompress(payload, limits.frame_bytes_max)?;
        buffer.advance(header.frame_bytes());
        return Ok(Some(Bytes::from(decompressed)));
    }
    let mut frame = buffer.split_to(header.frame_bytes());
    frame.advance(FRAME_HEADER_BYTES);
    Ok(Some(frame.freeze()))
}

/// Decompresses at most `bytes_max` bytes; one byte more is an error, not an allocation.
pub fn decompress(compressed: &[u8], bytes_max: usize) -> Result<Vec<u8>, DecodeError> {
    let corrupt = |error: std::io::Error| DecodeError::Corrupt(error.to_string());
    let mut decoder = zstd::stream::read::Decoder::with_buffer(compressed).map_err(corrupt)?;
    // The window is the decoder's big allocation; no honest frame within the limit needs a
    // window larger than the limit itself.
    decoder.window_log_max(window_log_for(bytes_max)).map_err(corrupt)?;
    let mut output = Vec::new();
    let mut chunk = vec![0u8; DECOMPRESSION_CHUNK_BYTES];
    loop {
        let read = decoder.read(&mut chunk).map_err(corrupt)?;
        if read == 0 {
            return Ok(output);
        }
        if output.len() + read > bytes_max {
            return Err(DecodeError::DecompressedTooLarge { bytes_max });
        }
        output.extend_from_slice(&chunk[..read]);
    }
}

/// The smallest zstd window log that covers `bytes_max`, within what zstd accepts (10 to 31;
/// we stop at 27, zstd's default maximum, which already covers 128 MiB).
fn window_log_for(bytes_max: usize) -> u32 {
    let needed = usize::BITS - bytes_max.saturating_sub(1).leading_zeros();
    needed.clamp(10, 27)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn limits(frame_bytes_max: usize) -> FrameLimits {
        FrameLimits { frame_bytes_max, compression_bytes_min: COMPRESSION_BYTES_MIN_DEFAULT }
    }

    fn encoded(payload: &[u8], limits: &FrameLimits) -> BytesMut {
        let mut output = Vec::new();
        encode(payload, limits, &mut output).unwrap();
        BytesMut::from(&output[..])
    }

    #[test]
    fn small_payloads_round_trip_uncompressed() {
        let limits = FrameLimits::default();
        for payload in [&b""[..], b"x", b"hello frames"] {
            let mut buffer = encoded(payload, &limits);
            assert_eq!(buffer[4], 0, "no flags below the compression threshold");
            assert_eq!(decode(&mut buffer, &limits).unwrap().unwrap(), payload);
            assert!(buffer.is_empty());
        }
    }

    #[test]
    fn large_compressible_payloads_are_compressed() {
        let limits = FrameLimits::default();
        let payload = b"concord ".repeat(100_000);
        let mut buffer = encoded(&payload, &limits);
        assert_eq!(buffer[4], FLAG_COMPRESSED);
        assert!(buffer.len() < payload.len() / 10);
        assert_eq!(decode(&mut buffer, &limits).unwrap().unwrap(), payload);
    }

    #[test]
    fn incompressible_payloads_are_sent_as_they_are() {
        let limits = FrameLimits::default();
        let payload = crate::tests::support::noise(0x9e37_79b9_7f4a_7c15, 10_000);
        let mut buffer = encoded(&payload, &limits);
        assert_eq!(buffer[4], 0);
        assert_eq!(decode(&mut buffer, &limits).unwrap().unwrap(), payload);
    }

    #[test]
    fn frames_split_at_every_byte_decode_once_complete() {
        let limits = FrameLimits::default();
        let mut wire = Vec::new();
        encode(b"first", &limits, &mut wire).unwrap();
        encode(&b"second ".repeat(1000), &limits, &mut wire).unwrap();
        let mut decoded = Vec::new();
        let mut buffer = BytesMut::new();
        for byte in wire {
            buffer.extend_from_slice(&[byte]);
            while let Some(payload) = decode(&mut buffer, &limits).unwrap() {
                decoded.push(payload);
            }
        }
        assert_eq!(decoded, vec![Bytes::from_static(b"first"), Bytes::from(b"second ".repeat(1000))]);
    }

    #[test]
    fn the_frame_limit_is_inclusive_on_both_sides() {
        let limits = limits(1000);
        let mut buffer = encoded(&[7u8; 1000], &limits);
        assert_eq!(decode(&mut buffer, &limits).unwrap().unwrap().len(), 1000);

        let error = encode(&[7u8; 1001], &limits, &mut Vec::new()).unwrap_err();
        assert!(matches!(error, EncodeError::TooLarge { bytes: 1001, bytes_max: 1000 }));
    }

    #[test]
    fn an_oversized_length_is_refused_from_the_header_alone() {
        let limits = limits(1000);
        let mut buffer = BytesMut::from(&[0, 0, 0x03, 0xe9, 0][..]);
        assert_eq!(decode(&mut buffer, &limits), Err(DecodeError::TooLarge { bytes: 1001, bytes_max: 1000 }));
        let mut buffer = BytesMut::from(&[0xff, 0xff, 0xff, 0xff, 0][..]);
        assert!(matches!(decode(&mut buffer, &limits), Err(DecodeError::TooLarge { .. })));
    }

    #[test]
    fn reserved_flags_are_refused() {
        let mut buffer = BytesMut::from(&[0, 0, 0, 1, 0b10, b'x'][..]);
        assert_eq!(decode(&mut buffer, &FrameLimits::default()), Err(DecodeError::UnknownFlags(0b10)));
    }

    #[test]
    fn corrupt_compressed_payloads_are_refused() {
        let mut buffer = BytesMut::from(&[0, 0, 0, 4, FLAG_COMPRESSED, 1, 2, 3, 4][..]);
        assert!(matches!(decode(&mut buffer, &FrameLimits::default()), Err(DecodeError::Corrupt(_))));
        let mut buffer = BytesMut::from(&[0, 0, 0, 0, FLAG_COMPRESSED][..]);
        assert!(matches!(decode(&mut buffer, &FrameLimits::default()), Err(DecodeError::Corrupt(_))), "empty");
    }

    fn framed(compressed: &[u8]) -> BytesMut {
        let mut wire = Vec::new();
        append(compressed, FLAG_COMPRESSED, &mut wire).unwrap();
        BytesMut::from(&wire[..])
    }

    #[test]
    fn a_decompression_bomb_stops_at_the_limit() {
        // 64 MiB of zeros in a few kilobytes, with a window the receiver accepts (1 MiB): the
        // receiver allows 1 MiB of output and stops one byte past it.
        let mut compressor = zstd::bulk::Compressor::new(3).unwrap();
        compressor.set_parameter(zstd::zstd_safe::CParameter::WindowLog(20)).unwrap();
        let bomb = compressor.compress(&vec![0u8; 64 * 1024 * 1024]).unwrap();
        assert!(bomb.len() < 64 * 1024);
        let limits = limits(1024 * 1024);
        assert_eq!(
            decode(&mut framed(&bomb), &limits),
            Err(DecodeError::DecompressedTooLarge { bytes_max: 1024 * 1024 })
        );
    }

    #[test]
    fn a_frame_asking_for_a_window_over_the_limit_is_refused_before_allocating_it() {
        // Compressed with the window its 64 MiB input suggests; the receiver allows 1 MiB.
        let bomb = zstd::bulk::compress(&vec![0u8; 64 * 1024 * 1024], 19).unwrap();
        let limits = limits(1024 * 1024);
        let error = decode(&mut framed(&bomb), &limits).unwrap_err();
        assert!(matches!(error, DecodeError::Corrupt(ref problem) if problem.contains("memory")), "{error}");
    }

    #[test]
    fn a_payload_exactly_at_the_limit_decompresses() {
        let limits = limits(1024 * 1024);
        let payload = vec![1u8; 1024 * 1024];
        let mut buffer = encoded(&payload, &limits);
        assert_eq!(buffer[4], FLAG_COMPRESSED);
        assert_eq!(decode(&mut buffer, &limits).unwrap().unwrap(), payload);
    }

    #[test]
    fn window_logs_cover_the_limit() {
        assert_eq!(window_log_for(0), 10);
        assert_eq!(window_log_for(1024), 10);
        assert_eq!(window_log_for(1025), 11);
        assert_eq!(window_log_for(16 * 1024 * 1024), 24);
        assert_eq!(window_log_for(usize::MAX), 27);
    }
}
