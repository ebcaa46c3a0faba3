//! The test bed itself: it boots, offers /dev/kvm, and returns a job's output and status.

use e2e_tests::{skip_if_missing, Error, Job, Testbed};

fn testbed(test: &str) -> Result<Option<Testbed>, Error> {
    skip_if_missing(test, Testbed::from_system())
}

#[test]
fn testbed_boots_and_has_kvm() -> Result<(), Error> {
    let Some(bed) = testbed("testbed_boots_and_has_kvm")? else {
        return Ok(());
    };
    let job = Job::new(
        "test -c /dev/kvm && echo kvm-ok\n\
         grep -c ^processor /proc/cpuinfo\n\
         grep -qw svm /proc/cpuinfo && echo svm-ok\n",
    );
    let out = bed.run(&job)?;
    eprintln!(
        "test bed: script started {:?} after QEMU start (guest uptime {:?} s), whole run {:?}",
        out.boot_time, out.guest_uptime_at_start, out.elapsed
    );
    assert_eq!(
        out.status, 0,
        "output:\n{}\nconsole:\n{}",
        out.output, out.console
    );
    assert_eq!(
        out.output, "kvm-ok\n2\nsvm-ok\n",
        "console:\n{}",
        out.console
    );
    Ok(())
}

#[test]
fn job_status_and_output_come_back() -> Result<(), Error> {
    let Some(bed) = testbed("job_status_and_output_come_back")? else {
        return Ok(());
    };
    let job = Job::new("echo out\necho err >&2\nprintf 'no newline'\nexit 7\n").data(
        "/job/payload.txt",
        "payload\n",
        0o644,
    );
    let out = bed.run(&job)?;
    assert_eq!(out.status, 7, "console:\n{}", out.console);
    assert_eq!(out.output, "out\nerr\nno newline");

    // Files and dynamically linked host programs (with their libraries) reach the job.
    let job = Job::new("cat /job/payload.txt && /usr/local/bin/host-true && echo dynamic-ok")
        .data("/job/payload.txt", "payload\n", 0o644)
        .binary("/usr/local/bin/host-true", "/bin/true");
    let out = bed.run(&job)?;
    assert_eq!(
        out.status, 0,
        "output:\n{}\nconsole:\n{}",
        out.output, out.console
    );
    assert_eq!(out.output, "payload\ndynamic-ok\n");
    Ok(())
}

#[test]
fn a_job_that_hangs_leaves_the_watchdogs_report() -> Result<(), Error> {
    let Some(bed) = testbed("a_job_that_hangs_leaves_the_watchdogs_report")? else {
        return Ok(());
    };
    let job = Job::new("echo before-the-hang\nsleep 100000\necho never\n")
        .timeout(std::time::Duration::from_secs(40));
    match bed.run_once(&job) {
        Err(Error::Timeout { console, .. }) => {
            let report = console
                .find("-WATCHDOG: the job is still running")
                .map(|at| &console[at..])
                .unwrap_or_else(|| panic!("no watchdog report on the console:\n{console}"));
            eprintln!("{report}");
            assert!(console.contains("before-the-hang"), "{console}");
            assert!(!console.contains("never"), "{console}");
            // The hung process, its thread's state and where in the kernel it waits.
            assert!(report.contains("sleep 100000"), "{report}");
            assert!(report.contains("state=S"), "{report}");
            assert!(report.contains("loadavg"), "{report}");
            assert!(report.contains("-WATCHDOG end"), "{report}");
            Ok(())
        }
        Err(other) => panic!("expected a timeout, got: {other}"),
        Ok(out) => panic!("a job that sleeps for a day ended: {out:?}"),
    }
}
