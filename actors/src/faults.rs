//! Fault injection for tests: `FAILPOINTS="name=return(arg)"` arms a point in builds
//! where the `fail` crate's `failpoints` feature is on (the test builds); elsewhere
//! every point compiles to nothing.

/// The argument of the armed point `name`, or `None`.
#[allow(unused_mut, unused_variables)]
pub fn injected(name: &str) -> Option<String> {
    let mut armed = None;
    let mut check = || {
        fail::fail_point!(name, |arg: Option<String>| {
            armed = Some(arg.unwrap_or_default());
        });
    };
    check();
    armed
}
