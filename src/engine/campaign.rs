//! The in-process fuzzing loop: LibAFL's mutations, scheduling, corpus and map feedback
//! around a [`Harness`] that runs one input (for kvmpy, a VM reset to its snapshot). No
//! Python here: the face runs [`Campaign::run`] with the interpreter lock released and
//! hears about findings through [`Findings`].
//!
//! Several worker processes (`--jobs`) share their corpus through a directory: each
//! writes the inputs that gave it new coverage there and reads the others' from time to
//! time, the way AFL++ syncs its `-M`/`-S` instances.

use std::cell::RefCell;
use std::collections::{HashMap, HashSet};
use std::fs;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use libafl::corpus::{Corpus, CorpusId, InMemoryCorpus};
use libafl::events::SimpleEventManager;
use libafl::executors::{Executor, ExitKind, WithObservers};
use libafl::feedback_or_fast;
use libafl::feedbacks::{CrashFeedback, MaxMapFeedback, TimeoutFeedback};
use libafl::fuzzer::{Evaluator, Fuzzer, StdFuzzer};
use libafl::inputs::{BytesInput, HasMutatorBytes};
use libafl::monitors::NopMonitor;
use libafl::mutators::{havoc_mutations, HavocScheduledMutator};
use libafl::observers::StdMapObserver;
use libafl::schedulers::QueueScheduler;
use libafl::stages::StdMutationalStage;
use libafl::state::{HasCorpus, HasExecutions, HasMaxSize, HasSolutions, StdState};
use libafl_bolts::rands::StdRand;
use libafl_bolts::tuples::tuple_list;

use crate::engine::coverage::block_hash;
use crate::engine::error::{Error, Result};
use crate::engine::exit::Exit;
use crate::engine::fuzz::Executor as FuzzExecutor;
use crate::engine::lock;

/// How one execution ended, as the fuzzing loop needs to know it.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Verdict {
    Ok,
    /// A crash of any kind; `bucket` names its cause (the face's (outcome, vector, rip)).
    Crash {
        bucket: u64,
    },
    Timeout,
}

/// Runs one input.
pub trait Harness {
    /// Runs `input` and sets the entries of `map` (all zero on entry) that its execution
    /// covered.
    fn run(&mut self, input: &[u8], map: &mut [u8]) -> Result<Verdict>;
    /// How many blocks the campaign has covered so far.
    fn covered(&self) -> usize;
}

/// Where findings go.
pub trait Findings {
    /// A crash in a new bucket, or a shorter input for a bucket already reported.
    fn crash(&mut self, input: &[u8], bucket: u64) -> Result<()>;
    /// A timeout shorter than any reported before.
    fn timeout(&mut self, input: &[u8]) -> Result<()>;
    /// Asked about every `poll_every`, between inputs: false stops the campaign.
    fn keep_going(&mut self, stats: &Stats) -> Result<bool>;
}

/// What a campaign is told.
#[derive(Clone, Debug)]
pub struct Options {
    /// The random seed: the same seed, seeds and target give the same campaign.
    pub seed: u64,
    /// The largest input the mutators make (longer seeds are cut).
    pub max_len: usize,
    /// The coverage map's size (a power of two).
    pub map_size: usize,
    /// Stop after this many executions (seeds count too).
    pub executions: Option<u64>,
    /// Stop after this long.
    pub duration: Option<Duration>,
    /// How often [`Findings::keep_going`] is asked and `sync_dir` read.
    pub poll_every: Duration,
    /// A directory shared with other workers: inputs that gave new coverage are written
    /// there as `<worker>-<n>`, and the other workers' files are read from it.
    pub sync_dir: Option<PathBuf>,
    /// This worker's name in `sync_dir` (letters, digits, `_`).
    pub worker: String,
}

impl Default for Options {
    fn default() -> Self {
        Options {
            seed: 0,
            max_len: 4096,
            map_size: 1 << 16,
            executions: None,
            duration: None,
            poll_every: Duration::from_millis(500),
            sync_dir: None,
            worker: "w0".into(),
        }
    }
}

/// Where a campaign stands.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub executions: u64,
    pub corpus: usize,
    /// Blocks covered (the harness's count).
    pub covered: usize,
    /// Crash buckets seen by this campaign.
    pub crash_buckets: usize,
    pub crashes: u64,
    pub timeouts: u64,
    /// The execution count when the corpus last grew.
    pub last_new_coverage: u64,
    /// Inputs read from other workers' files.
    pub imported: u64,
    pub elapsed: Duration,
}

/// What the executor saw, for the campaign to act on between LibAFL calls.
#[derive(Default)]
struct Book {
    /// The shortest input reported per crash bucket.
    shortest: HashMap<u64, usize>,
    shortest_timeout: Option<usize>,
    crashes: u64,
    timeouts: u64,
    /// Findings to report, in the order they were seen.
    pending: Vec<(Verdict, Vec<u8>)>,
    error: Option<Error>,
    /// The harness's block count after its last run.
    covered: usize,
}

impl Book {
    fn record(&mut self, verdict: Verdict, input: &[u8]) {
        let shorter = |known: Option<usize>| known.is_none_or(|n| input.len() < n);
        match verdict {
            Verdict::Ok => {}
            Verdict::Crash { bucket } => {
                self.crashes += 1;
                if shorter(self.shortest.get(&bucket).copied()) {
                    self.shortest.insert(bucket, input.len());
                    self.pending.push((verdict, input.to_vec()));
                }
            }
            Verdict::Timeout => {
                self.timeouts += 1;
                if shorter(self.shortest_timeout) {
                    self.shortest_timeout = Some(input.len());
                    self.pending.push((verdict, input.to_vec()));
                }
            }
        }
    }
}

/// LibAFL's executor over a [`Harness`].
struct Adapter<'a> {
    harness: &'a mut dyn Harness,
    map: *mut u8,
    map_len: usize,
    book: &'a RefCell<Book>,
}

impl<EM, S, Z> Executor<EM, BytesInput, S, Z> for Adapter<'_>
where
    S: HasExecutions,
{
    fn run_target(
        &mut self,
        _fuzzer: &mut Z,
        state: &mut S,
        _mgr: &mut EM,
        input: &BytesInput,
    ) -> std::result::Result<ExitKind, libafl::Error> {
        *state.executions_mut() += 1;
        // SAFETY: `map` points at the campaign's map, `map_len` bytes, alive for the whole
        // campaign; the map observer reads and resets it only before and after this call,
        // on this thread, so this is the only reference to it for the call's length.
        let map = unsafe { std::slice::from_raw_parts_mut(self.map, self.map_len) };
        let bytes = input.mutator_bytes();
        let result = self.harness.run(bytes, map);
        self.book.borrow_mut().covered = self.harness.covered();
        match result {
            Ok(verdict) => {
                self.book.borrow_mut().record(verdict, bytes);
                Ok(match verdict {
                    Verdict::Ok => ExitKind::Ok,
                    Verdict::Crash { .. } => ExitKind::Crash,
                    Verdict::Timeout => ExitKind::Timeout,
                })
            }
            Err(e) => {
                let text = e.to_string();
                self.book.borrow_mut().error = Some(e);
                Err(libafl::Error::illegal_state(text))
            }
        }
    }
}

/// The corpus directory shared by the workers of one campaign.
struct SyncDir {
    dir: PathBuf,
    prefix: String,
    published: u64,
    seen: HashSet<String>,
}

impl SyncDir {
    fn new(dir: &Path, worker: &str) -> Result<Self> {
        if worker.is_empty()
            || !worker
                .chars()
                .all(|c| c.is_ascii_alphanumeric() || c == '_')
        {
            return Err(Error::Value(format!(
                "a worker name is letters, digits and '_', not {worker:?}"
            )));
        }
        fs::create_dir_all(dir).map_err(|e| io_error("create", dir, e))?;
        Ok(SyncDir {
            dir: dir.to_path_buf(),
            prefix: format!("{worker}-"),
            published: 0,
            seen: HashSet::new(),
        })
    }

    /// Writes an input for the other workers (whole, or not at all: through a rename).
    fn publish(&mut self, input: &[u8]) -> Result<()> {
        let name = format!("{}{:06}", self.prefix, self.published);
        let tmp = self.dir.join(format!(".{name}.tmp"));
        let write = || -> std::io::Result<()> {
            let mut f = fs::File::create(&tmp)?;
            f.write_all(input)?;
            fs::rename(&tmp, self.dir.join(&name))
        };
        write().map_err(|e| io_error("write", &tmp, e))?;
        self.published += 1;
        self.seen.insert(name);
        Ok(())
    }

    /// The other workers' inputs not read before (unreadable or vanished files are
    /// left for a later look).
    fn incoming(&mut self) -> Result<Vec<Vec<u8>>> {
        let entries = fs::read_dir(&self.dir).map_err(|e| io_error("read", &self.dir, e))?;
        let mut names: Vec<String> = entries
            .filter_map(|e| e.ok()?.file_name().into_string().ok())
            .filter(|n| !n.starts_with('.') && !self.seen.contains(n))
            .collect();
        names.sort();
        let mut inputs = Vec::new();
        for name in names {
            if let Ok(data) = fs::read(self.dir.join(&name)) {
                self.seen.insert(name);
                inputs.push(data);
            }
        }
        Ok(inputs)
    }
}

fn io_error(what: &str, path: &Path, e: std::io::Error) -> Error {
    Error::Value(format!("cannot {what} {}: {e}", path.display()))
}

fn libafl_error(e: libafl::Error) -> Error {
    Error::Value(format!("fuzzing engine: {e}"))
}

/// One fuzzing campaign: options and seeds.
pub struct Campaign {
    options: Options,
    seeds: Vec<Vec<u8>>,
}

impl Campaign {
    /// A campaign starting from `seeds` (no seeds: one empty input).
    pub fn new(options: Options, seeds: Vec<Vec<u8>>) -> Result<Self> {
        if !options.map_size.is_power_of_two() {
            return Err(Error::Value(format!(
                "map_size must be a power of two, not {}",
                options.map_size
            )));
        }
        if options.max_len == 0 {
            return Err(Error::Value("max_len must be at least 1".into()));
        }
        Ok(Campaign { options, seeds })
    }

    /// Fuzzes until a limit of the options is reached or `findings` says stop.
    pub fn run(&self, harness: &mut dyn Harness, findings: &mut dyn Findings) -> Result<Stats> {
        let o = &self.options;
        let started = Instant::now();
        let book = RefCell::new(Book::default());
        let mut map = vec![0u8; o.map_size];
        // SAFETY: `map` outlives the observer (dropped with the executor at the end of this
        // function) and is touched only through it and the adapter, one at a time.
        let observer =
            unsafe { StdMapObserver::from_mut_ptr("coverage", map.as_mut_ptr(), map.len()) };
        let mut feedback = MaxMapFeedback::new(&observer);
        let mut objective = feedback_or_fast!(CrashFeedback::new(), TimeoutFeedback::new());
        let mut state = StdState::new(
            StdRand::with_seed(o.seed),
            InMemoryCorpus::<BytesInput>::new(),
            // The objective's corpus: emptied after every call (the findings keep what
            // matters), so that a campaign's memory does not grow with its crashes.
            InMemoryCorpus::new(),
            &mut feedback,
            &mut objective,
        )
        .map_err(libafl_error)?;
        state.set_max_size(o.max_len);
        let mut mgr = SimpleEventManager::new(NopMonitor::new());
        let mut fuzzer = StdFuzzer::new(QueueScheduler::new(), feedback, objective);
        let adapter = Adapter {
            harness,
            map: map.as_mut_ptr(),
            map_len: map.len(),
            book: &book,
        };
        let mut executor = WithObservers::new(adapter, tuple_list!(observer));
        let mut stages = tuple_list!(StdMutationalStage::new(HavocScheduledMutator::new(
            havoc_mutations()
        )));
        let mut sync = match &o.sync_dir {
            Some(dir) => Some(SyncDir::new(dir, &o.worker)?),
            None => None,
        };
        let mut last_new = 0;
        let mut imported = 0;
        let stats = |executions: u64, corpus: usize, last_new: u64, imported: u64| {
            let b = book.borrow();
            Stats {
                executions,
                corpus,
                covered: b.covered,
                crash_buckets: b.shortest.len(),
                crashes: b.crashes,
                timeouts: b.timeouts,
                last_new_coverage: last_new,
                imported,
                elapsed: started.elapsed(),
            }
        };

        let mut seeds: Vec<Vec<u8>> = self.seeds.clone();
        if seeds.is_empty() {
            seeds.push(Vec::new());
        }
        for mut seed in seeds {
            seed.truncate(o.max_len);
            // Seeds enter the corpus whatever their coverage: mutation starts from them.
            let r = fuzzer.add_input(&mut state, &mut executor, &mut mgr, BytesInput::new(seed));
            settle(&book, r.map(|_| ()), findings)?;
            drop_solutions(&mut state)?;
        }
        if state.corpus().count() == 0 {
            return Err(Error::Value(format!(
                "every seed crashed or timed out ({} of them): the fuzzer needs at least one \
                 that runs clean to mutate",
                self.seeds.len().max(1)
            )));
        }
        let mut corpus_seen = 0;
        let mut next_poll = Instant::now();
        loop {
            let count = state.corpus().count();
            if count > corpus_seen {
                last_new = *state.executions();
                if let Some(sync) = sync.as_mut() {
                    for id in corpus_seen..count {
                        let tc = state.corpus().get(CorpusId(id)).map_err(libafl_error)?;
                        if let Some(input) = tc.borrow().input() {
                            sync.publish(input.mutator_bytes())?;
                        }
                    }
                }
                corpus_seen = count;
            }
            let executions = *state.executions();
            if o.executions.is_some_and(|n| executions >= n)
                || o.duration.is_some_and(|d| started.elapsed() >= d)
            {
                break;
            }
            if Instant::now() >= next_poll {
                next_poll = Instant::now() + o.poll_every;
                if let Some(sync) = sync.as_mut() {
                    for mut input in sync.incoming()? {
                        input.truncate(o.max_len);
                        imported += 1;
                        let input = BytesInput::new(input);
                        let r = fuzzer.evaluate_input(&mut state, &mut executor, &mut mgr, &input);
                        settle(&book, r.map(|_| ()), findings)?;
                        drop_solutions(&mut state)?;
                    }
                    // What was read is not published again.
                    corpus_seen = state.corpus().count();
                }
                let now = stats(
                    *state.executions(),
                    state.corpus().count(),
                    last_new,
                    imported,
                );
                if !findings.keep_going(&now)? {
                    break;
                }
            }
            let r = fuzzer.fuzz_one(&mut stages, &mut executor, &mut state, &mut mgr);
            settle(&book, r.map(|_| ()), findings)?;
            drop_solutions(&mut state)?;
        }
        Ok(stats(
            *state.executions(),
            state.corpus().count(),
            last_new,
            imported,
        ))
    }
}

/// Empties the objective's corpus.
fn drop_solutions<S: HasSolutions<BytesInput>>(state: &mut S) -> Result<()> {
    let ids: Vec<CorpusId> = state.solutions().ids().collect();
    for id in ids {
        state.solutions_mut().remove(id).map_err(libafl_error)?;
    }
    Ok(())
}

/// Reports what the executor recorded during one LibAFL call, and ends the campaign with
/// the harness's own error when it had one.
fn settle(
    book: &RefCell<Book>,
    result: std::result::Result<(), libafl::Error>,
    findings: &mut dyn Findings,
) -> Result<()> {
    let (pending, error) = {
        let mut b = book.borrow_mut();
        (std::mem::take(&mut b.pending), b.error.take())
    };
    for (verdict, input) in pending {
        match verdict {
            Verdict::Crash { bucket } => findings.crash(&input, bucket)?,
            Verdict::Timeout => findings.timeout(&input)?,
            Verdict::Ok => {}
        }
    }
    if let Some(e) = error {
        return Err(e);
    }
    result.map_err(libafl_error)
}

/// A fuzzing [`FuzzExecutor`] as a campaign's harness: each input is one
/// `FuzzExecutor::run` (write, run, restore). With one-shot coverage a block shows up in
/// exactly one execution of the whole campaign, so the map gives each block its own
/// entry in the order they are found: a map as small as the block count, which the
/// feedback scans after every execution (an AFL-sized map would cost microseconds per
/// execution for nothing). With armed coverage the map is the executor's edge counts.
pub struct ExecutorHarness<'a> {
    pub executor: &'a FuzzExecutor,
    /// Called when `KVM_RUN` was interrupted by a signal that was not a kick.
    pub on_signal: Option<&'a dyn Fn() -> Result<()>>,
    /// Blocks given a map entry so far (one-shot coverage).
    found: usize,
}

impl<'a> ExecutorHarness<'a> {
    pub fn new(executor: &'a FuzzExecutor, on_signal: Option<&'a dyn Fn() -> Result<()>>) -> Self {
        ExecutorHarness {
            executor,
            on_signal,
            found: 0,
        }
    }

    /// The map size a campaign over `executor` needs.
    pub fn map_size(executor: &FuzzExecutor) -> usize {
        let cov = lock(&executor.vm.breakpoints);
        match cov.coverage.as_ref() {
            Some(c) if c.armed => c.map.len(),
            _ => {
                let blocks = executor.coverage.as_ref().map_or(0, |c| c.blocks);
                blocks.max(64).next_power_of_two()
            }
        }
    }
}

impl Harness for ExecutorHarness<'_> {
    fn run(&mut self, input: &[u8], map: &mut [u8]) -> Result<Verdict> {
        let execution = self.executor.run(input, self.on_signal)?;
        match lock(&self.executor.vm.breakpoints).coverage.as_ref() {
            Some(cov) if cov.armed && cov.map.len() == map.len() => map.copy_from_slice(&cov.map),
            _ => {
                for _ in &execution.new_blocks {
                    // Blocks beyond the map (none, with `map_size()`) share its last entry.
                    let at = self.found.min(map.len() - 1);
                    map[at] = 1;
                    self.found += 1;
                }
            }
        }
        let rip = execution.regs.as_ref().map_or(0, |r| r.rip);
        Ok(verdict(&execution.exit, rip))
    }

    fn covered(&self) -> usize {
        self.executor.blocks_covered()
    }
}

/// How the fuzzing loop sees an exit of a fuzz run (`rip`: where the run ended). The
/// crash buckets follow the face's triage: (kind, vector, rip).
pub fn verdict(exit: &Exit, rip: u64) -> Verdict {
    let bucket = |kind: u64, vector: u64, rip: u64| {
        block_hash(kind.wrapping_mul(0x1_0000_0001) ^ block_hash(vector ^ block_hash(rip)))
    };
    match exit {
        Exit::Guest { .. } | Exit::Stopped => Verdict::Ok,
        Exit::Timeout => Verdict::Timeout,
        Exit::Exception { vector, rip, .. } => Verdict::Crash {
            bucket: bucket(1, *vector, *rip),
        },
        Exit::Mmio { .. } => Verdict::Crash {
            bucket: bucket(2, 0, rip),
        },
        other => Verdict::Crash {
            bucket: bucket(3 + other.reason() as u64, 0, rip),
        },
    }
}

#[cfg(test)]
#[path = "campaign_tests.rs"]
mod tests;
