//! Helpers of the VM tier: the guest image, run folders, the nested demo suite,
//! and the QEMU processes a run left.

use std::ffi::OsStr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{Duration, Instant};

use matryoshka_test_programs::NESTED;

use super::Run;

pub fn image_dir() -> PathBuf {
    let dir = Path::new(env!("CARGO_MANIFEST_DIR")).join("../target/images/x86_64");
    assert!(
        dir.join("root.img").exists(),
        "no image at {}: build it with `./x image` (images/build.sh) before the VM tests",
        dir.display()
    );
    dir
}

/// A run folder of its own, so its QEMU processes can be found by their console path.
pub fn run_dir(name: &str) -> tempfile::TempDir {
    tempfile::Builder::new()
        .prefix(&format!("vm-{name}."))
        .tempdir_in(env!("CARGO_TARGET_TMPDIR"))
        .expect("run dir")
}

/// `matryoshka test COMPONENT` with the guest images of `image` and the run folder
/// `run_dir` (where its QEMU processes can be found by their console path); the
/// caller adds the rest of the arguments.
pub fn vm_test(component: impl AsRef<OsStr>, image: &Path, run_dir: &Path) -> Command {
    let mut cmd = super::bin();
    cmd.arg("test")
        .arg(component)
        .arg("--image-dir")
        .arg(image)
        .arg("--run-dir")
        .arg(run_dir);
    cmd
}

pub fn nested(run_dir: &Path, image: &Path, extra: &[&str]) -> (Run, Duration) {
    let started = Instant::now();
    let out = vm_test(NESTED, image, run_dir)
        .arg("--nocapture")
        .args(["--env"])
        .arg(format!("NESTED_ROOT={}", image.join("root.img").display()))
        .args(extra)
        .output()
        .expect("start matryoshka");
    (Run::from(out), started.elapsed())
}

/// QEMU processes whose command line names `run_dir`, after giving them a moment to go.
pub fn qemus_left(run_dir: &Path) -> Vec<String> {
    let needle = run_dir.display().to_string();
    let mut left = Vec::new();
    for _ in 0..50 {
        let out = Command::new("pgrep")
            .args(["-a", "-f", &needle])
            .output()
            .expect("pgrep");
        left = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter(|l| l.contains("qemu-system"))
            .map(str::to_string)
            .collect();
        if left.is_empty() {
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    left
}

#[track_caller]
pub fn expect_infrastructure_error(run: &Run, needles: &[&str]) {
    run.expect_code(101);
    let line = run.line_for("FAIL", "nested_levels");
    assert!(line.contains("L0 nested::nested_levels"), "{line}");
    for needle in needles {
        run.expect_stdout(needle);
    }
}

/// An image folder whose initramfs and root are the real ones and whose kernel is `kernel`.
pub fn image_with_kernel(dir: &Path, kernel: &[u8]) -> PathBuf {
    let real = image_dir();
    let image = dir.join("image");
    std::fs::create_dir_all(&image).expect("image dir");
    for f in ["initrd", "root.img"] {
        std::os::unix::fs::symlink(real.join(f), image.join(f)).expect("symlink");
    }
    std::fs::write(image.join("kernel"), kernel).expect("kernel");
    image
}

/// `timeline.html` of the run folder `dir` as headless Chromium (Debian's
/// `chromium-headless-shell`) renders it: its DOM after loading, each lane's
/// part by level, and a screenshot written to `png`.
pub struct Timeline {
    pub dom: String,
}

impl Timeline {
    pub fn render(dir: &Path, png: &Path) -> Self {
        let page = format!("file://{}", dir.join("timeline.html").display());
        let chromium = |args: &[&str]| {
            let out = Command::new("chromium-headless-shell")
                .args(["--no-sandbox", "--disable-gpu", "--hide-scrollbars"])
                .args(args)
                .arg(&page)
                .output()
                .expect("chromium-headless-shell (Debian package chromium-headless-shell)");
            assert!(
                out.status.success(),
                "chromium failed: {}",
                String::from_utf8_lossy(&out.stderr)
            );
            String::from_utf8_lossy(&out.stdout).into_owned()
        };
        let dom = chromium(&["--dump-dom"]);
        chromium(&[
            &format!("--screenshot={}", png.display()),
            "--window-size=1280,480",
        ]);
        let size = std::fs::metadata(png).map_or(0, |m| m.len());
        assert!(size > 10_000, "a screenshot of {size} bytes");
        Self { dom }
    }

    /// The part of the DOM inside the lane of `level`.
    #[track_caller]
    pub fn lane(&self, level: &str) -> &str {
        let start = format!("<g class=\"lane\" data-level=\"{level}\">");
        let at = self
            .dom
            .find(&start)
            .unwrap_or_else(|| panic!("no lane {level} in {}", self.dom));
        let rest = &self.dom[at..];
        &rest[..rest.find("</g>").unwrap_or(rest.len())]
    }
}
