//! Tests of the exit classes (`exit.rs`).

use super::*;
use crate::engine::internal_error;

/// Exits that a test guest cannot provoke on every host (FAIL_ENTRY, SYSTEM_EVENT,
/// DEBUG without guest debugging, unknown reasons) still become the right objects.
#[test]
fn every_exit_kind_becomes_its_python_class() {
    Python::initialize();
    Python::attach(|py| {
        type Case = (Exit, &'static str, Vec<(&'static str, u64)>);
        let cases: Vec<Case> = vec![
            (
                Exit::FailEntry {
                    hardware_reason: 0x21,
                    cpu: 1,
                },
                "FailEntryExit",
                vec![("hardware_entry_failure_reason", 0x21), ("cpu", 1)],
            ),
            (
                Exit::SystemEvent {
                    kind: 2,
                    data: vec![9],
                },
                "SystemEventExit",
                vec![("event_type", 2)],
            ),
            (
                Exit::Debug {
                    exception: 1,
                    pc: 0x1000,
                    dr6: 0xff0,
                    dr7: 0x400,
                },
                "DebugExit",
                vec![("exception", 1), ("pc", 0x1000), ("dr6", 0xff0)],
            ),
            (
                Exit::Unknown { raw: 99 },
                "UnknownExit",
                vec![("kvm_exit_reason", 99)],
            ),
            (
                Exit::InternalError {
                    suberror: 1,
                    data: vec![],
                    place: internal_error::Place {
                        rip: 0x1000,
                        bits: 64,
                        reset: false,
                    },
                },
                "InternalErrorExit",
                vec![("suberror", 1), ("rip", 0x1000), ("bits", 64)],
            ),
            (
                Exit::Guest {
                    port: 0xf4,
                    code: 3,
                },
                "GuestExit",
                vec![("code", 3), ("port", 0xf4)],
            ),
            (
                Exit::Breakpoint { address: 0x1234 },
                "BreakpointExit",
                vec![("address", 0x1234)],
            ),
            (Exit::Step { rip: 0x99 }, "StepExit", vec![("rip", 0x99)]),
            (
                Exit::Watchpoint(
                    Box::new(crate::engine::watch::WatchHit {
                        watch: crate::engine::watch::Watch {
                            vaddr: 0x2008,
                            gpa: 0x3008,
                            len: 8,
                            kind: crate::engine::watch::WatchKind::Write,
                            owner: None,
                        },
                        access: 0x3009,
                        size: 1,
                        is_write: true,
                        old: 0,
                        new: 0x100,
                    }),
                    0x77,
                ),
                "WatchpointExit",
                vec![
                    ("address", 0x2008),
                    ("access", 0x3009),
                    ("length", 8),
                    ("rip", 0x77),
                    ("new", 0x100),
                ],
            ),
            (Exit::Shutdown, "ExitInfo", vec![]),
            (Exit::Hlt, "ExitInfo", vec![]),
            (Exit::Timeout, "ExitInfo", vec![]),
            (Exit::Stopped, "ExitInfo", vec![]),
            (
                Exit::Io {
                    port: 0x10,
                    size: 1,
                    count: 1,
                    is_write: true,
                    data: Data::new(&[7]),
                },
                "IoExit",
                vec![("port", 0x10), ("value", 7)],
            ),
            (
                Exit::Mmio {
                    addr: 0xd000,
                    size: 4,
                    is_write: false,
                    data: Data::default(),
                },
                "MmioExit",
                vec![("address", 0xd000), ("size", 4)],
            ),
            (
                Exit::Exception {
                    vector: 14,
                    error_code: 2,
                    rip: 0x1000,
                    cs: 0x1b,
                    rflags: 2,
                    rsp: 0,
                    cr2: 8,
                },
                "ExceptionExit",
                vec![("vector", 14), ("cr2", 8)],
            ),
        ];
        let mut seen = std::collections::BTreeSet::new();
        for (exit, class, fields) in cases {
            let obj = to_python(py, &exit, 5).unwrap();
            let obj = obj.bind(py);
            assert_eq!(obj.cast::<ExitInfo>().unwrap().get().reason, exit.reason());
            seen.insert(exit.reason());
            assert_eq!(obj.get_type().name().unwrap().to_string(), class);
            assert_eq!(obj.getattr("vcpu_id").unwrap().extract::<u64>().unwrap(), 5);
            for (field, value) in fields {
                let got: u64 = obj.getattr(field).unwrap().extract().unwrap();
                assert_eq!(got, value, "{class}.{field}");
            }
            assert!(!stop_requested(obj));
            obj.call_method0("stop").unwrap();
            assert!(stop_requested(obj));
        }
        // Every reason a run can end with has been turned into an object above.
        for r in Reason::ALL {
            assert!(seen.contains(&r), "{r:?}");
        }
    });
}
