//! WAL segment files: naming, the file header, and scanning a segment back into records.
//!
//! A segment is `wal/{id:020}.log`: a 16-byte header (`SPOOLWAL`, format version, reserved)
//! followed by frames (see `record.rs`). Segments are only ever appended to, and only the
//! newest one is open for writing, so damage at the end of the newest segment is a torn write
//! from a crash (cut it), while damage anywhere else is corruption (fail closed).

use std::{
    fs,
    io::{self, Read, Write},
    path::{Path, PathBuf},
};

use super::record::{FRAME_HEADER, Frame, MAX_RECORD, Record, decode_frame};

pub const MAGIC: &[u8; 8] = b"SPOOLWAL";
pub const VERSION: u32 = 1;
pub const HEADER_LEN: u64 = 16;

pub fn path(dir: &Path, id: u64) -> PathBuf {
    dir.join(format!("{id:020}.log"))
}

/// Segment ids in `dir`, oldest first. Other files are ignored.
pub fn list(dir: &Path) -> io::Result<Vec<u64>> {
    let mut ids = Vec::new();
    for entry in fs::read_dir(dir)? {
        let name = entry?.file_name();
        let Some(name) = name.to_str() else { continue };
        if let Some(id) = name
            .strip_suffix(".log")
            .and_then(|s| s.parse::<u64>().ok())
        {
            ids.push(id);
        }
    }
    ids.sort_unstable();
    Ok(ids)
}

/// Creates a new segment holding only its header, and makes its directory entry durable.
pub fn create(dir: &Path, id: u64) -> io::Result<fs::File> {
    let p = path(dir, id);
    let mut file = fs::OpenOptions::new()
        .create_new(true)
        .append(true)
        .open(&p)?;
    file.write_all(&header())?;
    file.sync_all()?;
    sync_dir(dir)?;
    Ok(file)
}

/// The 16 bytes every segment starts with.
pub fn header() -> Vec<u8> {
    let mut header = Vec::with_capacity(HEADER_LEN as usize);
    header.extend_from_slice(MAGIC);
    header.extend_from_slice(&VERSION.to_le_bytes());
    header.extend_from_slice(&0u32.to_le_bytes());
    header
}

pub fn sync_dir(dir: &Path) -> io::Result<()> {
    fs::File::open(dir)?.sync_all()
}

/// How a scanned segment ends.
#[derive(Debug, PartialEq, Eq)]
pub enum Tail {
    /// Every byte belongs to a valid record.
    Clean,
    /// Bytes from `at` on are a partial write with no valid record after them.
    Torn { at: u64 },
    /// A damaged record at `at`, with valid data after it (or in a segment that is not the
    /// newest): this is not a torn write, and nothing may be guessed.
    Corrupt { at: u64, why: &'static str },
}

pub struct Scan {
    pub records: Vec<Record>,
    pub tail: Tail,
}

/// Reads a segment whole. Damage in the newest segment (`is_last`) with nothing valid after it
/// is a torn tail; any other damage is reported as corruption.
pub fn scan(p: &Path, is_last: bool) -> io::Result<Scan> {
    let mut records = Vec::new();
    let tail = scan_each(p, is_last, |_, _, record| records.push(record))?;
    Ok(Scan { records, tail })
}

/// How much of a segment [`scan_each`] reads at a time.
const SCAN_CHUNK: usize = 1024 * 1024;

/// Reads a segment and hands each record to `f` with its frame's byte position and length, in
/// order, holding at most one chunk (or one frame, if larger) in memory: recovery keeps what
/// it needs of each record, not the segment. Damage is told as [`scan`] tells it; records
/// before it have been handed over.
pub fn scan_each(
    p: &Path,
    is_last: bool,
    mut f: impl FnMut(u64, usize, Record),
) -> io::Result<Tail> {
    let mut file = fs::File::open(p)?;
    let mut head = Vec::with_capacity(HEADER_LEN as usize);
    (&mut file).take(HEADER_LEN).read_to_end(&mut head)?;
    if let Some(tail) = bad_header(&head, is_last) {
        return Ok(tail);
    }
    // `buf[used..]` is unread; `base` is the file position of `buf[0]`.
    let mut buf: Vec<u8> = Vec::new();
    let mut base = HEADER_LEN;
    let mut used = 0usize;
    let mut eof = false;
    loop {
        if used == buf.len() && eof {
            return Ok(Tail::Clean);
        }
        match decode_frame(&buf[used..]) {
            Frame::Record(record, len) => {
                f(base + used as u64, len, record);
                used += len;
            }
            Frame::Incomplete if !eof => {
                buf.drain(..used);
                base += used as u64;
                used = 0;
                let frame = if buf.len() >= FRAME_HEADER {
                    FRAME_HEADER + u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize
                } else {
                    0
                };
                let want = SCAN_CHUNK.max(frame.min(FRAME_HEADER + MAX_RECORD));
                let have = buf.len();
                buf.resize(have.max(want), 0);
                let mut filled = have;
                while filled < buf.len() {
                    match file.read(&mut buf[filled..]) {
                        Ok(0) => {
                            eof = true;
                            break;
                        }
                        Ok(n) => filled += n,
                        Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                        Err(e) => return Err(e),
                    }
                }
                buf.truncate(filled);
            }
            damage => {
                let at = base + used as u64;
                // A torn write leaves only partial frames behind it; a valid frame after the
                // damage means it is in the middle of good data (the rare path: read the rest).
                if is_last {
                    let mut rest = buf[used..].to_vec();
                    file.read_to_end(&mut rest)?;
                    if !any_record_after(&rest, 1) {
                        return Ok(Tail::Torn { at });
                    }
                }
                return Ok(match damage {
                    Frame::Corrupt(why) => Tail::Corrupt { at, why },
                    _ => Tail::Corrupt {
                        at,
                        why: "truncated record",
                    },
                });
            }
        }
    }
}

/// What a segment whose first bytes are `buf` (at most the header) is, if not a segment.
fn bad_header(buf: &[u8], is_last: bool) -> Option<Tail> {
    if buf.len() < HEADER_LEN as usize || &buf[..8] != MAGIC {
        // A crash right after creating the file can leave it shorter than its header.
        let tail = if is_last
            && buf.len() < HEADER_LEN as usize
            && MAGIC.starts_with(&buf[..buf.len().min(8)])
        {
            Tail::Torn { at: 0 }
        } else {
            Tail::Corrupt {
                at: 0,
                why: "not a Spool WAL segment (bad header)",
            }
        };
        return Some(tail);
    }
    let version = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    (version != VERSION).then_some(Tail::Corrupt {
        at: 8,
        why: "unsupported segment format version",
    })
}

/// Whether a valid frame starts anywhere at or after `from`. A torn write leaves only partial
/// frames behind it; a valid frame there means the damage is in the middle of good data.
fn any_record_after(buf: &[u8], from: usize) -> bool {
    (from..buf.len()).any(|i| matches!(decode_frame(&buf[i..]), Frame::Record(..)))
}

/// Cuts a torn tail off the newest segment.
pub fn truncate(p: &Path, at: u64) -> io::Result<()> {
    let file = fs::OpenOptions::new().write(true).open(p)?;
    file.set_len(at.max(HEADER_LEN))?;
    file.sync_all()
}
