//! Unit tests of the breakpoint table (`breakpoints.rs`).

use super::*;

/// Python's handler sees the hit, gdb does not.
const PY: Audience = Audience {
    python: true,
    gdb: false,
};
/// gdb sees the hit, Python's handler does not.
const GDB: Audience = Audience {
    python: false,
    gdb: true,
};

#[test]
fn a_breakpoint_is_patched_once_and_restored_by_its_last_owner() {
    let mut t = Breakpoints::default();
    let w = t.insert(0x1000, 0x1000, 0x90, Owner::Vcpu(0), false);
    assert_eq!(
        w,
        Ok(Write::Byte {
            gpa: 0x1000,
            byte: PATCH
        })
    );
    assert_eq!(
        t.insert(0x1000, 0x1000, PATCH, Owner::Vm, false),
        Ok(Write::None)
    );
    assert_eq!(t.get(0x1000).unwrap().original, 0x90);
    assert_eq!(t.hit(0x1000, 0), Hit::Report(PY));
    assert_eq!(t.hit(0x1000, 7), Hit::Report(PY), "the VM's too");
    assert_eq!(t.remove(0x1000, Owner::Vm), Ok(Write::None));
    assert_eq!(t.hit(0x1000, 7), Hit::Pass, "only vCPU 0's now");
    assert_eq!(
        t.remove(0x1000, Owner::Vcpu(0)),
        Ok(Write::Byte {
            gpa: 0x1000,
            byte: 0x90
        })
    );
    assert_eq!(
        t.remove(0x1000, Owner::Vcpu(0)),
        Err(TableError::Missing { vaddr: 0x1000 })
    );
    assert_eq!(t.hit(0x1000, 0), Hit::Stale, "kept for a trap taken before");
    assert!(t.has_retired() && t.originals().is_empty());
    t.purge_retired();
    assert!(t.is_empty());
    assert_eq!(t.hit(0x1000, 0), Hit::NotOurs);
}

#[test]
fn a_removed_breakpoint_is_stale_until_purged_and_may_be_set_again() {
    let mut t = Breakpoints::default();
    t.insert_patch(0x10, 0x10, 0x55, Owner::Vm, false, PIO_PATCH)
        .unwrap();
    t.remove(0x10, Owner::Vm).unwrap();
    assert!(
        t.pio_at(0x10) && t.has_pio(),
        "a port write from it is still known"
    );
    assert_eq!(
        t.rearm(0x10),
        Write::None,
        "a step over it does not re-patch"
    );
    let again = t.insert(0x10, 0x10, 0x55, Owner::Vcpu(1), false).unwrap();
    assert_eq!(
        again,
        Write::Byte {
            gpa: 0x10,
            byte: PIO_PATCH
        }
    );
    assert_eq!(
        (t.hit(0x10, 1), t.hit(0x10, 0)),
        (Hit::Report(PY), Hit::Pass)
    );
    t.remove(0x10, Owner::Vcpu(1)).unwrap();
    // Another address for the same byte replaces the removed one.
    t.insert(0x20, 0x10, 0x55, Owner::Vm, false).unwrap();
    assert!(t.get(0x10).is_none() && !t.has_pio());
    t.remove(0x20, Owner::Vm).unwrap();
    t.purge_retired();
    assert!(t.is_empty());
}

#[test]
fn gdbs_breakpoints_are_reported_to_gdb_only() {
    let mut t = Breakpoints::default();
    t.insert(0x10, 0x10, 0x90, Owner::Gdb, false).unwrap();
    t.insert(0x20, 0x20, 0x90, Owner::Vcpu(1), false).unwrap();
    assert_eq!(
        (t.hit(0x10, 0), t.hit(0x10, 1)),
        (Hit::Report(GDB), Hit::Report(GDB))
    );
    let gdb_only = Audience {
        python: false,
        gdb: true,
    };
    assert_eq!(t.audience(0x10, 0), gdb_only);
    t.insert(0x20, 0x20, PATCH, Owner::Gdb, false).unwrap();
    let both = Audience {
        python: true,
        gdb: true,
    };
    assert_eq!(t.audience(0x20, 1), both);
    assert_eq!(
        t.audience(0x20, 0),
        gdb_only,
        "vCPU 1's own is not vCPU 0's"
    );
    assert_eq!(t.audience(0x30, 0), Audience::default());
    assert_eq!(
        t.hit(0x20, 1),
        Hit::Report(PY.or(GDB)),
        "a hit carries who it is for, as it was at the trap"
    );
    t.remove(0x20, Owner::Gdb).unwrap();
    assert_eq!(t.hit(0x20, 0), Hit::Pass);
}

#[test]
fn two_virtual_addresses_may_not_patch_one_byte() {
    let mut t = Breakpoints::default();
    t.insert(0x1000, 0x5000, 1, Owner::Vm, false).unwrap();
    assert_eq!(
        t.insert(0x2000, 0x5000, PATCH, Owner::Vm, false),
        Err(TableError::Alias {
            vaddr: 0x1000,
            gpa: 0x5000
        })
    );
}

#[test]
fn stepping_over_disarms_and_rearms() {
    let mut t = Breakpoints::default();
    t.insert(0x10, 0x10, 0x55, Owner::Vm, false).unwrap();
    assert_eq!(
        t.disarm(0x10),
        Write::Byte {
            gpa: 0x10,
            byte: 0x55
        }
    );
    assert_eq!(t.hit(0x10, 0), Hit::NotOurs, "disarmed: no trap is ours");
    assert!(t.originals().is_empty());
    assert_eq!(t.disarm(0x10), Write::None);
    assert_eq!(
        t.rearm(0x10),
        Write::Byte {
            gpa: 0x10,
            byte: PATCH
        }
    );
    assert_eq!(t.originals(), vec![(0x10, 0x55)]);
    // Removed while disarmed: nothing to write back.
    t.disarm(0x10);
    assert_eq!(t.remove(0x10, Owner::Vm), Ok(Write::None));
}

#[test]
fn a_trap_on_another_vcpu_while_one_steps_over_is_still_a_hit() {
    let mut t = Breakpoints::default();
    t.insert(0x10, 0x10, 0x55, Owner::Vm, false).unwrap();
    t.insert(0x20, 0x20, 0x56, Owner::Vcpu(0), false).unwrap();
    assert_ne!(t.step_out(0x10, 0), Write::None);
    assert_eq!(t.get(0x10).unwrap().stepper, Some(0));
    assert_eq!(
        t.hit(0x10, 0),
        Hit::NotOurs,
        "the stepper runs the original"
    );
    assert_eq!(
        t.hit(0x10, 1),
        Hit::Report(PY),
        "vCPU 1 trapped before it went out"
    );
    t.step_out(0x20, 0);
    assert_eq!(t.hit(0x20, 1), Hit::Pass, "vCPU 0's: vCPU 1 steps over it");
    t.rearm(0x10);
    assert_eq!(t.get(0x10).unwrap().stepper, None);
    assert_eq!(t.hit(0x10, 0), Hit::Report(PY));
}

#[test]
fn one_shot_entries_go_away_on_their_first_hit() {
    let mut t = Breakpoints::default();
    t.insert(0x20, 0x20, 0x48, Owner::Vm, true).unwrap();
    assert_eq!(t.hit(0x20, 3), Hit::OneShot);
    assert_eq!(
        t.disarm(0x20),
        Write::Byte {
            gpa: 0x20,
            byte: 0x48
        }
    );
    assert!(t.is_empty());
}

#[test]
fn repatch_learns_new_originals_and_hide_shows_them() {
    let mut t = Breakpoints::default();
    t.insert(0x100, 0x100, 0x11, Owner::Vm, false).unwrap();
    t.insert(0x200, 0x200, 0x22, Owner::Vm, false).unwrap();
    // A restore copied 0x100's page back (a clean byte 0x33); 0x200 still patched.
    let writes = t.repatch(|gpa| Some(if gpa == 0x100 { 0x33 } else { PATCH }));
    assert_eq!(writes, vec![(0x100, PATCH)]);
    assert_eq!(t.originals(), vec![(0x100, 0x33), (0x200, 0x22)]);
    let mut buf = [PATCH; 0x180];
    t.hide(0x100, &mut buf);
    assert_eq!((buf[0], buf[1]), (0x33, PATCH));
}

#[test]
fn coverage_entries_live_in_an_image_and_queue_their_originals() {
    let mut t = Breakpoints::default();
    t.insert_coverage(0x30, 0x30, 0x55, PIO_PATCH, true)
        .unwrap();
    t.insert_coverage(0x40, 0x40, 0x48, PIO_PATCH, false)
        .unwrap();
    assert_eq!(
        t.insert_coverage(0x30, 0x30, 0x55, PIO_PATCH, true),
        Err(TableError::Taken { vaddr: 0x30 })
    );
    assert!(t.has_pio() && t.pio_at(0x30) && !t.pio_at(0x31));
    assert_eq!(t.coverage_blocks(), 2);
    assert_eq!((t.hit(0x30, 0), t.hit(0x40, 0)), (Hit::OneShot, Hit::Count));
    // A restore brings image patches back itself: nothing to re-patch.
    assert!(t.repatch(|_| Some(0x55)).is_empty());
    // Snapshots and reads still hide them.
    assert_eq!(t.originals(), vec![(0x30, 0x55), (0x40, 0x48)]);
    // The one-shot hit: the original goes to memory now and to the image later.
    assert_eq!(
        t.disarm(0x30),
        Write::Byte {
            gpa: 0x30,
            byte: 0x55
        }
    );
    assert_eq!(t.image_writes, vec![(0x30, 0x55)]);
    assert!(!t.pio_at(0x30) && t.get(0x30).is_none());
    // An armed entry is stepped over and comes back with its own patch byte.
    t.disarm(0x40);
    assert!(
        t.has_pio() && t.pio_at(0x40),
        "a port write from it may still come"
    );
    assert_eq!(
        t.rearm(0x40),
        Write::Byte {
            gpa: 0x40,
            byte: PIO_PATCH
        }
    );
    assert!(t.has_pio());
    // A debugger breakpoint on a coverage block makes it a breakpoint.
    t.insert(0x40, 0x40, PIO_PATCH, Owner::Vm, false).unwrap();
    assert_eq!(t.hit(0x40, 0), Hit::Report(PY));
    assert_eq!(t.clear_coverage(), vec![]);
    t.remove(0x40, Owner::Vm).unwrap();
    assert_eq!(t.image_writes, vec![(0x30, 0x55), (0x40, 0x48)]);
    assert!(t.is_empty() && !t.has_pio() && t.coverage_blocks() == 0);
}

#[test]
fn a_removed_breakpoint_whose_original_is_the_patch_is_the_guests_own_instruction() {
    let mut t = Breakpoints::default();
    // A port-io patch on the guest's own `out dx, al`, another on a `nop`.
    t.insert_patch(0x10, 0x10, PIO_PATCH, Owner::Vm, false, PIO_PATCH)
        .unwrap();
    t.insert_patch(0x20, 0x20, 0x90, Owner::Vm, false, PIO_PATCH)
        .unwrap();
    t.remove(0x10, Owner::Vm).unwrap();
    t.remove(0x20, Owner::Vm).unwrap();
    assert_eq!(
        t.hit(0x10, 0),
        Hit::NotOurs,
        "patch or original, the guest wrote once"
    );
    assert_eq!(t.hit(0x20, 0), Hit::Stale, "the patch ran: run the nop");
    // The same for an int3 patch on the guest's own int3.
    t.insert(0x30, 0x30, PATCH, Owner::Vcpu(0), false).unwrap();
    t.remove(0x30, Owner::Vcpu(0)).unwrap();
    assert_eq!(t.hit(0x30, 0), Hit::NotOurs);
}
