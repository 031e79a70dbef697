//! The conformance suite, run on the blocking runtime.

qcow2_conformance::instantiate!(qcow2_conformance::sync::SyncHarness);
