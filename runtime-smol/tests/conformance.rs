//! The conformance suite, run on the smol runtime.

qcow2_conformance::instantiate!(qcow2_conformance::smol::SmolHarness::new());
