//! WAL segment files: naming, the file header, and scanning a segment back into records.
//!
//! A segment is `wal/{id:020}.log`: a 16-byte header (`SPOOLWAL`, format version, reserved)
//! followed by frames (see `record.rs`). Segments are only ever appended to, and only the
//! newest one is open for writing, so damage at the end of the newest segment is a torn write
//! from a crash (cut it), while damage anywhere else is corruption (fail closed).

use std::{
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use super::record::{Frame, Record, decode_frame};

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

/// Reads a segment. Damage in the newest segment (`is_last`) with nothing valid after it is a
/// torn tail; any other damage is reported as corruption.
pub fn scan(p: &Path, is_last: bool) -> io::Result<Scan> {
    let buf = fs::read(p)?;
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
        return Ok(Scan {
            records: Vec::new(),
            tail,
        });
    }
    let version = u32::from_le_bytes([buf[8], buf[9], buf[10], buf[11]]);
    if version != VERSION {
        return Ok(Scan {
            records: Vec::new(),
            tail: Tail::Corrupt {
                at: 8,
                why: "unsupported segment format version",
            },
        });
    }
    let mut records = Vec::new();
    let mut pos = HEADER_LEN as usize;
    while pos < buf.len() {
        match decode_frame(&buf[pos..]) {
            Frame::Record(record, len) => {
                records.push(record);
                pos += len;
            }
            Frame::Incomplete | Frame::Corrupt(_)
                if is_last && !any_record_after(&buf, pos + 1) =>
            {
                return Ok(Scan {
                    records,
                    tail: Tail::Torn { at: pos as u64 },
                });
            }
            Frame::Incomplete => {
                return Ok(Scan {
                    records,
                    tail: Tail::Corrupt {
                        at: pos as u64,
                        why: "truncated record",
                    },
                });
            }
            Frame::Corrupt(why) => {
                return Ok(Scan {
                    records,
                    tail: Tail::Corrupt {
                        at: pos as u64,
                        why,
                    },
                });
            }
        }
    }
    Ok(Scan {
        records,
        tail: Tail::Clean,
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
