//! The memory this process may use (its cgroup's limit, else the machine's), which bounds
//! the SQLite page cache a run asks for (`target.sqlite_cache_mib`).
//!
//! The cache is a ceiling SQLite fills only as far as the database is large, and a large
//! first load fills it (BENCHMARKS.md, "Session 21"). A default chosen on a 24 GiB machine
//! must not take a 512 MiB container or a `MemoryMax=` unit over its limit: the cache gets at
//! most a quarter of what this process may use, and the log says when it was lowered.
//!
//! Hand-written: three small files, read once when a target opens. The crates that know
//! cgroups (sysinfo, cgroups-rs) bring a whole system-inspection library for it.

use std::path::Path;

/// The share of the memory limit the page cache may take.
const CACHE_SHARE: u64 = 4;

/// The smallest cache tidemark lowers to, in MiB (about SQLite's own 2 MB default).
const MIN_CACHE_MIB: u32 = 2;

/// `cache_mib` lowered to a quarter of `limit` bytes (at least [`MIN_CACHE_MIB`]); 0 (SQLite's
/// own default) and an unknown limit leave it as it is.
fn cache_within(cache_mib: u32, limit: Option<u64>) -> u32 {
    let Some(limit) = limit else { return cache_mib };
    if cache_mib == 0 {
        return 0;
    }
    let share = (limit / CACHE_SHARE) >> 20;
    cache_mib.min(u32::try_from(share).unwrap_or(u32::MAX).max(MIN_CACHE_MIB))
}

/// The SQLite page cache `asked` MiB may have: at most a quarter of the memory this process
/// may use, logged when lowered: the budget of a whole pool, which its connections share
/// (`SqliteTuning::of`).
pub fn sqlite_cache_budget(asked: u32) -> u32 {
    let limit = memory_limit();
    let cache_mib = cache_within(asked, limit);
    if cache_mib < asked {
        tracing::info!(
            asked_mib = asked,
            cache_mib,
            memory_limit_mib = limit.unwrap_or_default() >> 20,
            "target.sqlite_cache_mib lowered to a quarter of the memory this process may use \
             (its cgroup's limit, else the machine's)"
        );
    }
    cache_mib
}

/// The memory this process may use, in bytes: the smallest limit of its cgroup and the
/// cgroups above it (v2 `memory.max`, v1 `memory.limit_in_bytes`), else the machine's
/// (`MemTotal`); None where none can be read (not Linux).
fn memory_limit() -> Option<u64> {
    let cgroup = std::fs::read_to_string("/proc/self/cgroup").unwrap_or_default();
    let meminfo = std::fs::read_to_string("/proc/meminfo").unwrap_or_default();
    let machine = mem_total(&meminfo);
    let limit = cgroup_limit(Path::new("/sys/fs/cgroup"), &cgroup);
    match (limit, machine) {
        (Some(l), Some(m)) => Some(l.min(m)),
        (l, m) => l.or(m),
    }
}

/// `MemTotal` of `/proc/meminfo`, in bytes.
fn mem_total(meminfo: &str) -> Option<u64> {
    let line = meminfo.lines().find(|l| l.starts_with("MemTotal:"))?;
    let kib: u64 = line.split_whitespace().nth(1)?.parse().ok()?;
    Some(kib * 1024)
}

/// The smallest memory limit on the way from the cgroup `/proc/self/cgroup` names up to the
/// root under `root` (the cgroup mount). A container usually sees its own cgroup as the root
/// of the mount, so the root's own file counts too.
fn cgroup_limit(root: &Path, proc_cgroup: &str) -> Option<u64> {
    let mut best: Option<u64> = None;
    let mut note = |v: Option<u64>| {
        if let Some(v) = v {
            best = Some(best.map_or(v, |b| b.min(v)));
        }
    };
    for line in proc_cgroup.lines() {
        let mut parts = line.splitn(3, ':');
        let (Some(_), Some(controllers), Some(path)) = (parts.next(), parts.next(), parts.next())
        else {
            continue;
        };
        let (dir, file) = if controllers.is_empty() {
            (root.to_path_buf(), "memory.max") // v2: one unified hierarchy
        } else if controllers.split(',').any(|c| c == "memory") {
            (root.join("memory"), "memory.limit_in_bytes") // v1
        } else {
            continue;
        };
        let mut at = dir.join(path.trim_start_matches('/'));
        loop {
            note(read_limit(&at.join(file)));
            if at == dir || !at.pop() {
                break;
            }
        }
        note(read_limit(&dir.join(file)));
    }
    best
}

/// One limit file: a number of bytes, or `max` (v2) / a huge number (v1) for none.
fn read_limit(file: &Path) -> Option<u64> {
    let text = std::fs::read_to_string(file).ok()?;
    let v: u64 = text.trim().parse().ok()?;
    // v1 writes "no limit" as the largest page-aligned i64.
    (v < (1 << 62)).then_some(v)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_cache_takes_at_most_a_quarter_of_the_limit() {
        const MIB: u64 = 1 << 20;
        assert_eq!(
            cache_within(512, Some(24 * 1024 * MIB)),
            512,
            "a large machine"
        );
        assert_eq!(
            cache_within(512, Some(512 * MIB)),
            128,
            "a 512 MiB container"
        );
        assert_eq!(
            cache_within(512, Some(4 * MIB)),
            MIN_CACHE_MIB,
            "never below SQLite's own"
        );
        assert_eq!(cache_within(512, None), 512, "unknown limit");
        assert_eq!(
            cache_within(0, Some(512 * MIB)),
            0,
            "0 stays SQLite's default"
        );
    }

    #[test]
    fn limits_come_from_the_cgroup_and_its_parents() {
        let root = tempfile::tempdir().unwrap();
        let unit = root.path().join("system.slice/tidemark.service");
        std::fs::create_dir_all(&unit).unwrap();
        std::fs::write(unit.join("memory.max"), "536870912\n").unwrap();
        std::fs::write(root.path().join("system.slice/memory.max"), "max\n").unwrap();
        let v2 = "0::/system.slice/tidemark.service\n";
        assert_eq!(cgroup_limit(root.path(), v2), Some(512 << 20));
        // A parent's smaller limit wins; "max" is none.
        std::fs::write(root.path().join("system.slice/memory.max"), "268435456\n").unwrap();
        assert_eq!(cgroup_limit(root.path(), v2), Some(256 << 20));
        // v1: the memory controller's hierarchy; its "no limit" is a huge number.
        let v1root = root.path().join("memory/docker/abc");
        std::fs::create_dir_all(&v1root).unwrap();
        std::fs::write(
            v1root.join("memory.limit_in_bytes"),
            "9223372036854771712\n",
        )
        .unwrap();
        let v1 = "12:cpu,cpuacct:/docker/abc\n9:memory:/docker/abc\n";
        assert_eq!(cgroup_limit(root.path(), v1), None);
        std::fs::write(v1root.join("memory.limit_in_bytes"), "1073741824\n").unwrap();
        assert_eq!(cgroup_limit(root.path(), v1), Some(1 << 30));
        assert_eq!(cgroup_limit(root.path(), ""), None, "no cgroup");
    }

    #[test]
    fn the_machine_total_is_read_from_meminfo() {
        let m = "MemTotal:       24589196 kB\nMemFree:         1000 kB\n";
        assert_eq!(mem_total(m), Some(24_589_196 * 1024));
        assert_eq!(mem_total("garbage"), None);
        if cfg!(target_os = "linux") {
            assert!(memory_limit().is_some(), "Linux has /proc/meminfo");
        }
    }
}
