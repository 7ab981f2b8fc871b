//! `spool repair`: gets a data directory with damaged WAL segments (or a damaged session file)
//! to start again, losing only what the damage took.
//!
//! The damaged range of a segment is everything from the first bad byte to the end of that
//! segment (nothing after a bad frame can be trusted to be the next frame). The repair keeps
//! the segment's valid prefix, moves the original file to `quarantine/`, and works out which
//! streams had messages in the damaged range: every segment starts with a snapshot of every
//! stream's epoch and head, so a stream whose head in the next snapshot is the head it had at
//! the damage lost nothing; any other stream's history is *cut*. When no snapshot follows the
//! damage (it is in the newest segment), any stream known at that point may have written
//! there, so all of them count as cut.
//!
//! A cut stream gets a new epoch, so a reader holding a position in the old history gets a
//! reset (`epoch_changed`), never a silent gap; its retained messages after the damage stay
//! and are served in the new epoch. Every other stream keeps its epoch and every message.
//!
//! The new epochs are written to `EPOCHS` in the data directory — `(segments before, stream,
//! old epoch, new epoch)` — rather than into the segments: recovery reads each `Stream`
//! record of an older segment naming an old epoch as the new one, so the segments are never
//! rewritten, and a stream's messages in them belong to the new epoch on every later start
//! too. An entry is dropped once no segment it applies to is left.
//!
//! Consumer groups lose nothing to damage that a later segment's complete snapshot follows:
//! it restates every group as it was durable then. Damage that none follows (in the newest
//! segment) takes the group records after it: every group comes back as it was at the
//! damaged byte — an older version, whose messages not acked by then are delivered again — and
//! a group created after it is gone, one deleted after it is back. The report lists the groups
//! so rolled back ([`GroupRollback`]), and the repair logs them.

use std::{
    collections::{HashMap, HashSet},
    fs,
    io::{self, Write},
    path::{Path, PathBuf},
};

use spool_core::{Epoch, Offset, StreamName, group::GroupName};

use super::{LOCK_FILE, OpenError, QUARANTINE_DIR, SESSIONS_FILE, io_err, record::Record, segment};

/// The file of epochs given by repairs.
pub const EPOCHS_FILE: &str = "EPOCHS";

/// One epoch given by a repair.
#[derive(Clone, Debug, PartialEq, Eq)]
struct Renamed {
    /// Applies to segments with a smaller id (the segments that existed at the repair).
    before: u64,
    stream: StreamName,
    from: Epoch,
    to: Epoch,
}

/// The epochs given by repairs, applied to the records of older segments (see module docs).
#[derive(Clone, Debug, Default)]
pub struct EpochMap {
    entries: Vec<Renamed>,
}

impl EpochMap {
    /// Reads `EPOCHS` (none is an empty map). A damaged file fails closed: guessing would
    /// give a stream back an epoch whose history has a hole.
    pub fn load(dir: &Path) -> Result<Self, OpenError> {
        let path = dir.join(EPOCHS_FILE);
        let text = match fs::read_to_string(&path) {
            Ok(text) => text,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(Self::default()),
            Err(e) => return Err(io_err(&path)(e)),
        };
        let bad = |line: &str| OpenError::Io {
            path: path.clone(),
            source: io::Error::new(
                io::ErrorKind::InvalidData,
                format!("unreadable line {line:?} (written by spool repair; do not edit)"),
            ),
        };
        let mut entries = Vec::new();
        for line in text.lines() {
            if line.is_empty() || line.starts_with('#') {
                continue;
            }
            let mut parts = line.splitn(4, ' ');
            let (Some(before), Some(from), Some(to), Some(stream)) =
                (parts.next(), parts.next(), parts.next(), parts.next())
            else {
                return Err(bad(line));
            };
            entries.push(Renamed {
                before: before.parse().map_err(|_| bad(line))?,
                from: Epoch::parse(from).map_err(|_| bad(line))?,
                to: Epoch::parse(to).map_err(|_| bad(line))?,
                stream: StreamName::new(stream).map_err(|_| bad(line))?,
            });
        }
        Ok(Self { entries })
    }

    /// Reads a `Stream` record of `segment` with the epochs repairs gave since it was written.
    pub fn apply(&self, segment: u64, record: &mut Record) {
        let Record::Stream { name, epoch, .. } = record else {
            return;
        };
        for e in &self.entries {
            if segment < e.before && e.stream == *name && e.from == *epoch {
                *epoch = e.to.clone();
            }
        }
    }

    /// Forgets entries no remaining segment needs (`oldest`: the oldest segment left).
    pub fn prune(&mut self, dir: &Path, oldest: u64) -> io::Result<()> {
        let before = self.entries.len();
        self.entries.retain(|e| e.before > oldest);
        if self.entries.len() == before {
            return Ok(());
        }
        if self.entries.is_empty() {
            fs::remove_file(dir.join(EPOCHS_FILE))?;
            return segment::sync_dir(dir);
        }
        self.save(dir)
    }

    fn save(&self, dir: &Path) -> io::Result<()> {
        let mut text = String::from(
            "# written by spool repair: streams whose history a repair cut, and their new epochs.\n\
             # Needed until the segments before <segment> are gone; do not edit or delete.\n\
             # <segment> <old epoch> <new epoch> <stream>\n",
        );
        for e in &self.entries {
            text.push_str(&format!("{} {} {} {}\n", e.before, e.from, e.to, e.stream));
        }
        write_atomically(dir, EPOCHS_FILE, text.as_bytes())
    }
}

/// Writes `name` in `dir` so that a crash leaves either the old file or the new one.
fn write_atomically(dir: &Path, name: &str, bytes: &[u8]) -> io::Result<()> {
    let tmp = dir.join(format!("{name}.tmp"));
    let mut file = fs::File::create(&tmp)?;
    file.write_all(bytes)?;
    file.sync_all()?;
    fs::rename(&tmp, dir.join(name))?;
    segment::sync_dir(dir)
}

/// A damaged segment.
#[derive(Clone, Debug)]
pub struct Damage {
    pub segment: PathBuf,
    /// The first bad byte; the valid records before it are kept.
    pub at: u64,
    pub why: &'static str,
}

/// A stream whose history a repair cuts.
#[derive(Clone, Debug)]
pub struct Cut {
    pub stream: StreamName,
    pub epoch: Epoch,
    pub new_epoch: Epoch,
}

/// A consumer group that comes back older after a repair: as it was at the damaged byte.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct GroupRollback {
    pub stream: StreamName,
    pub group: GroupName,
    /// The version it comes back at (commits after it are lost).
    pub version: u64,
}

/// What a repair does (or, with `--dry-run`, would do).
#[derive(Debug, Default)]
pub struct RepairReport {
    pub damaged: Vec<Damage>,
    /// Streams that get a new epoch, by name.
    pub cut: Vec<Cut>,
    /// Streams that keep their epoch and every message.
    pub intact: usize,
    /// Consumer groups that come back as they were at the damage (see the module docs).
    pub groups_rolled_back: Vec<GroupRollback>,
    /// Why `sessions.redb` cannot be opened, if it cannot.
    pub sessions_damaged: Option<String>,
    /// Where the damaged files went (empty on a dry run).
    pub quarantined: Vec<PathBuf>,
}

impl RepairReport {
    pub fn is_clean(&self) -> bool {
        self.damaged.is_empty() && self.sessions_damaged.is_none()
    }
}

/// Repairs the data directory `dir` (see the module docs); with `dry_run`, only says what it
/// would do. Refuses while another process (a running server) holds the directory's `LOCK`.
pub fn repair(dir: &Path, dry_run: bool) -> Result<RepairReport, OpenError> {
    let wal = dir.join("wal");
    if !wal.is_dir() {
        return Err(OpenError::Io {
            path: wal,
            source: io::Error::new(
                io::ErrorKind::NotFound,
                "not a data directory of the disk engine (no wal/ in it)",
            ),
        });
    }
    let _lock = lock(dir, dry_run)?;
    let map = EpochMap::load(dir)?;
    let ids = segment::list(&wal).map_err(io_err(&wal))?;
    let mut report = plan(&wal, &ids, &map)?;
    report.sessions_damaged = check_sessions(dir, dry_run)?;
    if dry_run || report.is_clean() {
        return Ok(report);
    }

    // The new epochs first: once a damaged segment is replaced by its prefix, nothing but
    // this file stops the cut streams from continuing in their old epochs.
    if !report.cut.is_empty() {
        let before = ids.last().map_or(1, |last| last + 1);
        let mut map = map;
        map.entries.extend(report.cut.iter().map(|c| Renamed {
            before,
            stream: c.stream.clone(),
            from: c.epoch.clone(),
            to: c.new_epoch.clone(),
        }));
        map.save(dir).map_err(io_err(dir))?;
    }
    let quarantine = dir.join(QUARANTINE_DIR);
    for damage in &report.damaged {
        fs::create_dir_all(&quarantine).map_err(io_err(&quarantine))?;
        let to = free_name(&quarantine, &damage.segment);
        // The valid prefix goes beside the segment, the original to the quarantine, then the
        // prefix replaces the segment in one rename: a crash leaves the original or the prefix.
        let bytes = fs::read(&damage.segment).map_err(io_err(&damage.segment))?;
        // A bad header keeps nothing but a fresh header (the segment's id stays taken).
        let keep = (damage.at as usize).min(bytes.len());
        let prefix = if keep < segment::HEADER_LEN as usize {
            segment::header()
        } else {
            bytes[..keep].to_vec()
        };
        let tmp = damage.segment.with_extension("log.repair");
        let mut file = fs::File::create(&tmp).map_err(io_err(&tmp))?;
        file.write_all(&prefix).map_err(io_err(&tmp))?;
        file.sync_all().map_err(io_err(&tmp))?;
        let mut copy = fs::File::create(&to).map_err(io_err(&to))?;
        copy.write_all(&bytes).map_err(io_err(&to))?;
        copy.sync_all().map_err(io_err(&to))?;
        segment::sync_dir(&quarantine).map_err(io_err(&quarantine))?;
        fs::rename(&tmp, &damage.segment).map_err(io_err(&damage.segment))?;
        segment::sync_dir(&wal).map_err(io_err(&wal))?;
        tracing::warn!(
            segment = %damage.segment.display(), at = damage.at, why = damage.why,
            copy = %to.display(), kept = keep, "cut a damaged segment at its first bad byte"
        );
        report.quarantined.push(to);
    }
    if !report.groups_rolled_back.is_empty() {
        tracing::warn!(
            groups = report.groups_rolled_back.len(),
            "consumer groups come back as they were at the damaged byte: commits after it are lost, so their messages not acked by then are delivered again"
        );
        for g in report.groups_rolled_back.iter().take(50) {
            tracing::warn!(stream = %g.stream, group = %g.group, version = g.version, "consumer group rolled back");
        }
    }
    if report.sessions_damaged.is_some() {
        fs::create_dir_all(&quarantine).map_err(io_err(&quarantine))?;
        let from = dir.join(SESSIONS_FILE);
        let to = free_name(&quarantine, &from);
        fs::rename(&from, &to).map_err(io_err(&from))?;
        segment::sync_dir(dir).map_err(io_err(dir))?;
        tracing::warn!(to = %to.display(), "moved a damaged session file aside");
        report.quarantined.push(to);
    }
    Ok(report)
}

/// Takes the directory's lock for the repair, so no server can open it meanwhile and none is
/// running. A dry run changes nothing, so it does not create the file.
fn lock(dir: &Path, dry_run: bool) -> Result<Option<fs::File>, OpenError> {
    let path = dir.join(LOCK_FILE);
    let file = if dry_run {
        match fs::File::open(&path) {
            Ok(f) => f,
            Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(io_err(&path)(e)),
        }
    } else {
        fs::OpenOptions::new()
            .create(true)
            .truncate(false)
            .write(true)
            .open(&path)
            .map_err(io_err(&path))?
    };
    match file.try_lock() {
        Ok(()) => Ok(Some(file)),
        Err(fs::TryLockError::WouldBlock) => Err(OpenError::Locked { path }),
        Err(fs::TryLockError::Error(e)) => Err(io_err(&path)(e)),
    }
}

/// `quarantine/<file name>`, or with `.1`, `.2` … when an earlier repair used that name.
fn free_name(quarantine: &Path, file: &Path) -> PathBuf {
    let name = file
        .file_name()
        .map_or_else(|| "damaged".into(), |n| n.to_string_lossy().into_owned());
    let mut to = quarantine.join(&name);
    let mut n = 1;
    while to.exists() {
        to = quarantine.join(format!("{name}.{n}"));
        n += 1;
    }
    to
}

/// Why the session file cannot be used, if it cannot. A dry run checks a copy (redb's check
/// commits to the file it opens).
fn check_sessions(dir: &Path, dry_run: bool) -> Result<Option<String>, OpenError> {
    let path = dir.join(SESSIONS_FILE);
    if !path.exists() {
        return Ok(None);
    }
    let check = |p: &Path| {
        crate::sessions::SessionFile::check(p)
            .map(Result::err)
            .map_err(io_err(&path))
    };
    if !dry_run {
        return check(&path);
    }
    let tmp = std::env::temp_dir().join(format!(
        "spool-repair-check-{}-{}.redb",
        std::process::id(),
        spool_core::now_ms()
    ));
    fs::copy(&path, &tmp).map_err(io_err(&path))?;
    let result = check(&tmp);
    let _ = fs::remove_file(&tmp);
    result
}

/// Reads every segment as recovery would, tracking each stream's epoch and head, and finds the
/// damaged segments and the streams whose history they cut.
fn plan(wal: &Path, ids: &[u64], map: &EpochMap) -> Result<RepairReport, OpenError> {
    let mut state: HashMap<StreamName, (Epoch, Offset)> = HashMap::new();
    // Streams that may have written into damaged bytes, with where they were before them;
    // settled by the next snapshot.
    let mut unsettled: HashMap<StreamName, (Epoch, Offset)> = HashMap::new();
    // Damage was found and no complete snapshot has followed it yet.
    let mut settling = false;
    let mut cut: HashSet<StreamName> = HashSet::new();
    let mut damaged = Vec::new();
    // Each group's version, as recovery rebuilds it; and the groups as they were at damage
    // that no complete snapshot has followed yet.
    let mut groups: HashMap<(StreamName, GroupName), u64> = HashMap::new();
    let mut groups_at_damage: Option<HashMap<(StreamName, GroupName), u64>> = None;
    for (i, &id) in ids.iter().enumerate() {
        let path = segment::path(wal, id);
        let scan = segment::scan(&path, i + 1 == ids.len()).map_err(io_err(&path))?;
        let mut snapshot = true;
        let mut seen = HashSet::new();
        let mut restated = HashSet::new();
        for mut record in scan.records {
            map.apply(id, &mut record);
            match record {
                Record::Stream { name, epoch, head } => {
                    if snapshot && seen.insert(name.clone()) {
                        match unsettled.remove(&name) {
                            Some(before) if before == (epoch.clone(), head) => {}
                            Some(_) => {
                                cut.insert(name.clone());
                            }
                            // Born in the damaged bytes with messages there.
                            None if settling
                                && !state.contains_key(&name)
                                && head > Offset::ZERO =>
                            {
                                cut.insert(name.clone());
                            }
                            None => {}
                        }
                    }
                    match state.get_mut(&name) {
                        Some(s) if s.0 == epoch => s.1 = s.1.max(head),
                        _ => {
                            state.insert(name, (epoch, head));
                        }
                    }
                }
                Record::Message { name, message, .. } => {
                    if snapshot {
                        snapshot = false;
                        settling = false;
                        cut.extend(unsettled.drain().map(|(name, _)| name));
                    }
                    if let Some(s) = state.get_mut(&name) {
                        s.1 = s.1.max(message.offset);
                    }
                }
                Record::SnapshotEnd => {
                    if snapshot {
                        snapshot = false;
                        settling = false;
                        cut.extend(unsettled.drain().map(|(name, _)| name));
                    }
                    let restated = std::mem::take(&mut restated);
                    groups.retain(|key, _| restated.contains(key));
                    groups_at_damage = None;
                }
                Record::GroupPut {
                    version,
                    snapshot: s,
                    ..
                } => {
                    let key = (s.stream, s.group);
                    restated.insert(key.clone());
                    groups.insert(key, version);
                }
                Record::GroupCommit {
                    stream,
                    group,
                    version,
                    ..
                } => {
                    if let Some(v) = groups.get_mut(&(stream, group))
                        && version == *v + 1
                    {
                        *v = version;
                    }
                }
                Record::GroupDeleted { stream, group } => {
                    groups.remove(&(stream, group));
                }
                Record::StreamDeleted { name, epoch } => {
                    if state.get(&name).is_some_and(|s| s.0 == epoch) {
                        state.remove(&name);
                    }
                }
                Record::StreamTruncated { .. } => {}
            }
        }
        match scan.tail {
            segment::Tail::Clean => {
                if snapshot {
                    // The whole segment was the snapshot: a stream missing from it is cut.
                    settling = false;
                    cut.extend(unsettled.drain().map(|(name, _)| name));
                }
            }
            segment::Tail::Torn { .. } => {}
            segment::Tail::Corrupt { at, why } => {
                groups_at_damage.get_or_insert_with(|| groups.clone());
                settling = true;
                for (name, s) in &state {
                    unsettled.entry(name.clone()).or_insert_with(|| s.clone());
                }
                damaged.push(Damage {
                    segment: path,
                    at,
                    why,
                });
            }
        }
    }
    // Damage that no snapshot follows: any stream known then may have written there.
    cut.extend(unsettled.into_keys());
    let mut cut: Vec<Cut> = cut
        .into_iter()
        .filter_map(|stream| {
            let (epoch, _) = state.get(&stream)?.clone();
            Some(Cut {
                stream,
                epoch,
                new_epoch: Epoch::generate(),
            })
        })
        .collect();
    cut.sort_by(|a, b| a.stream.as_str().cmp(b.stream.as_str()));
    let intact = state.len() - cut.len();
    let mut groups_rolled_back: Vec<GroupRollback> = groups_at_damage
        .unwrap_or_default()
        .into_iter()
        .map(|((stream, group), version)| GroupRollback {
            stream,
            group,
            version,
        })
        .collect();
    groups_rolled_back.sort_by(|a, b| {
        (a.stream.as_str(), a.group.as_str()).cmp(&(b.stream.as_str(), b.group.as_str()))
    });
    Ok(RepairReport {
        damaged,
        cut,
        intact,
        groups_rolled_back,
        ..RepairReport::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn stream_record(name: &str, epoch: &str) -> Record {
        Record::Stream {
            name: StreamName::new(name).unwrap(),
            epoch: Epoch::parse(epoch).unwrap(),
            head: Offset(3),
        }
    }

    fn epoch_of(record: &Record) -> &str {
        match record {
            Record::Stream { epoch, .. } => epoch.as_str(),
            _ => unreachable!(),
        }
    }

    #[test]
    fn the_epoch_map_survives_a_reload_chains_repairs_and_is_pruned() {
        let dir = tempfile::tempdir().unwrap();
        let renamed = |before, from: &str, to: &str| Renamed {
            before,
            stream: StreamName::new("chat:a").unwrap(),
            from: Epoch::parse(from).unwrap(),
            to: Epoch::parse(to).unwrap(),
        };
        let map = EpochMap {
            entries: vec![renamed(5, "old", "mid"), renamed(9, "mid", "new")],
        };
        map.save(dir.path()).unwrap();
        let mut map = EpochMap::load(dir.path()).unwrap();
        assert_eq!(map.entries.len(), 2);

        let mut r = stream_record("chat:a", "old");
        map.apply(4, &mut r);
        assert_eq!(epoch_of(&r), "new", "two repairs chain");
        let mut r = stream_record("chat:a", "mid");
        map.apply(7, &mut r);
        assert_eq!(epoch_of(&r), "new");
        let mut r = stream_record("chat:a", "mid");
        map.apply(9, &mut r);
        assert_eq!(
            epoch_of(&r),
            "mid",
            "segments written after the repair are as they are"
        );
        let mut r = stream_record("chat:b", "old");
        map.apply(1, &mut r);
        assert_eq!(epoch_of(&r), "old", "other streams are untouched");

        map.prune(dir.path(), 6).unwrap();
        assert_eq!(EpochMap::load(dir.path()).unwrap().entries.len(), 1);
        map.prune(dir.path(), 9).unwrap();
        assert!(!dir.path().join(EPOCHS_FILE).exists());

        fs::write(dir.path().join(EPOCHS_FILE), "12 not-a-line\n").unwrap();
        assert!(
            EpochMap::load(dir.path()).is_err(),
            "a damaged map fails closed"
        );
    }
}
