//! Tests of the fuzzing loop (`campaign.rs`) with a harness that needs no VM.

use super::*;

/// A target that crashes on inputs starting with `MAGIC` and covers one map entry per
/// byte of the prefix matched so far; inputs starting with `SLOW` time out.
struct Prefix {
    covered: HashSet<usize>,
}

const MAGIC: &[u8] = b"KV!";

impl Harness for Prefix {
    fn run(&mut self, input: &[u8], map: &mut [u8]) -> Result<Verdict> {
        let n = input.iter().zip(MAGIC).take_while(|(a, b)| a == b).count();
        map[..=n].fill(1);
        self.covered.extend(0..=n);
        if input.starts_with(b"SLOW") {
            return Ok(Verdict::Timeout);
        }
        Ok(if n == MAGIC.len() {
            Verdict::Crash { bucket: 7 }
        } else {
            Verdict::Ok
        })
    }

    fn covered(&self) -> usize {
        self.covered.len()
    }
}

#[derive(Default)]
struct Found {
    crashes: Vec<(Vec<u8>, u64)>,
    timeouts: Vec<Vec<u8>>,
    polls: u32,
    stop_after_crash: bool,
}

impl Findings for Found {
    fn crash(&mut self, input: &[u8], bucket: u64) -> Result<()> {
        self.crashes.push((input.to_vec(), bucket));
        Ok(())
    }
    fn timeout(&mut self, input: &[u8]) -> Result<()> {
        self.timeouts.push(input.to_vec());
        Ok(())
    }
    fn keep_going(&mut self, _stats: &Stats) -> Result<bool> {
        self.polls += 1;
        Ok(!self.stop_after_crash || self.crashes.is_empty())
    }
}

fn options(executions: u64) -> Options {
    Options {
        seed: 1,
        max_len: 64,
        map_size: 64,
        executions: Some(executions),
        poll_every: Duration::ZERO,
        ..Options::default()
    }
}

#[test]
fn coverage_guides_the_campaign_to_the_crash_and_reports_it_once_per_bucket() {
    let mut harness = Prefix {
        covered: HashSet::new(),
    };
    let mut found = Found::default();
    let campaign = Campaign::new(options(100_000), vec![b"hello".to_vec()]).unwrap();
    let stats = campaign.run(&mut harness, &mut found).unwrap();
    assert!(!found.crashes.is_empty(), "no crash in {stats:?}");
    assert!(found
        .crashes
        .iter()
        .all(|(input, bucket)| { *bucket == 7 && input.starts_with(MAGIC) }));
    // Reported again only when shorter.
    let lens: Vec<usize> = found.crashes.iter().map(|(i, _)| i.len()).collect();
    assert!(lens.windows(2).all(|w| w[1] < w[0]), "{lens:?}");
    assert_eq!(stats.crash_buckets, 1);
    assert!(stats.crashes >= found.crashes.len() as u64);
    assert_eq!(stats.covered, MAGIC.len() + 1);
    assert_eq!(
        stats.corpus,
        MAGIC.len(),
        "one entry per prefix length: {stats:?}"
    );
    assert!(stats.executions >= 100_000);
}

#[test]
fn the_same_seed_gives_the_same_campaign() {
    let run = || {
        let mut harness = Prefix {
            covered: HashSet::new(),
        };
        let mut found = Found::default();
        let campaign = Campaign::new(options(20_000), vec![b"K".to_vec()]).unwrap();
        let stats = campaign.run(&mut harness, &mut found).unwrap();
        (
            stats.corpus,
            stats.crashes,
            stats.last_new_coverage,
            found.crashes,
        )
    };
    assert_eq!(run(), run());
}

#[test]
fn findings_can_stop_a_campaign_and_timeouts_are_reported() {
    let mut harness = Prefix {
        covered: HashSet::new(),
    };
    let mut found = Found {
        stop_after_crash: true,
        ..Found::default()
    };
    let campaign = Campaign::new(
        options(u64::MAX),
        vec![b"KV".to_vec(), b"SLOW and long".to_vec()],
    )
    .unwrap();
    let stats = campaign.run(&mut harness, &mut found).unwrap();
    assert_eq!(found.crashes.len(), 1, "{stats:?}");
    assert!(stats.executions < u64::MAX);
    assert_eq!(
        found.timeouts.first().map(Vec::as_slice),
        Some(&b"SLOW and long"[..])
    );
    assert!(stats.timeouts >= 1);
}

#[test]
fn workers_share_their_corpus_through_the_sync_directory() {
    let dir = std::env::temp_dir().join(format!("kvmpy-sync-{}", std::process::id()));
    let _ = fs::remove_dir_all(&dir);
    let mut one = Options {
        sync_dir: Some(dir.clone()),
        worker: "a".into(),
        ..options(50_000)
    };
    let mut harness = Prefix {
        covered: HashSet::new(),
    };
    Campaign::new(one.clone(), vec![b"KV".to_vec()])
        .unwrap()
        .run(&mut harness, &mut Found::default())
        .unwrap();
    let published = fs::read_dir(&dir).unwrap().count();
    assert!(published >= 1);
    // A second worker starting from nothing reads the first one's inputs.
    one.worker = "b".into();
    one.executions = Some(10);
    let mut harness = Prefix {
        covered: HashSet::new(),
    };
    let stats = Campaign::new(one, vec![])
        .unwrap()
        .run(&mut harness, &mut Found::default())
        .unwrap();
    assert_eq!(stats.imported, published as u64);
    assert!(stats.covered >= 3, "{stats:?}");
    fs::remove_dir_all(&dir).unwrap();
}

#[test]
fn a_campaign_whose_seeds_all_crash_says_so() {
    let mut harness = Prefix {
        covered: HashSet::new(),
    };
    let err = Campaign::new(options(100), vec![b"KV!".to_vec(), b"SLOW".to_vec()])
        .unwrap()
        .run(&mut harness, &mut Found::default())
        .unwrap_err();
    assert!(err
        .to_string()
        .contains("every seed crashed or timed out (2 of them)"));
}

#[test]
fn bad_options_are_refused() {
    let bad = |o: Options| Campaign::new(o, vec![]).err().unwrap().to_string();
    assert!(bad(Options {
        map_size: 1000,
        ..Options::default()
    })
    .contains("power of two"));
    assert!(bad(Options {
        max_len: 0,
        ..Options::default()
    })
    .contains("max_len"));
    let mut harness = Prefix {
        covered: HashSet::new(),
    };
    let o = Options {
        sync_dir: Some(std::env::temp_dir()),
        worker: "../x".into(),
        ..options(1)
    };
    let err = Campaign::new(o, vec![])
        .unwrap()
        .run(&mut harness, &mut Found::default())
        .unwrap_err();
    assert!(err.to_string().contains("worker name"));
}
