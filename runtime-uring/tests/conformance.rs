//! The conformance suite, run on the io_uring runtime.

qcow2_conformance::instantiate!(qcow2_conformance::uring::UringHarness::new());
