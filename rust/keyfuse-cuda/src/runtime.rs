//! Finding the CUDA libraries and a device, and compiling the kernels once per process.
//!
//! A missing library must never panic: cudarc's dynamic loader panics on first use of a
//! library it cannot open, so presence is checked first (`is_culib_present`), and the whole
//! probe also runs inside `catch_unwind`. The outcome is cached in a `static OnceLock`.

use std::panic::{AssertUnwindSafe, UnwindSafe};
use std::path::Path;
use std::sync::{Arc, Mutex, OnceLock};

use cudarc::driver::{CudaContext, CudaFunction, CudaModule, CudaSlice, CudaStream};
use cudarc::nvrtc::{compile_ptx_with_opts, CompileOptions, Ptx};
use keyfuse_core::{KfError, Result};

use crate::kernels::{module_source, KERNEL_NAMES};

/// Run `f`, turning a panic into `Err` without the default hook's message on stderr: a
/// missing or too-old CUDA library must not print anything when `device="auto"` simply
/// falls back to the CPU. (The hook is process-wide; it is swapped only around these
/// short library probes.)
fn quietly<T>(f: impl FnOnce() -> T + UnwindSafe) -> std::thread::Result<T> {
    thread_local!(static DEPTH: std::cell::Cell<u32> = const { std::cell::Cell::new(0) });
    static LOCK: Mutex<()> = Mutex::new(());
    if DEPTH.with(|d| d.get()) > 0 {
        // nested inside an outer quiet section: its silent hook is already installed
        return std::panic::catch_unwind(f);
    }
    let _guard = LOCK.lock().unwrap_or_else(|e| e.into_inner());
    DEPTH.with(|d| d.set(1));
    let previous = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let out = std::panic::catch_unwind(f);
    std::panic::set_hook(previous);
    DEPTH.with(|d| d.set(0));
    out
}

/// Environment variable naming an explicit `libnvrtc.so` to load (e.g. from the pip wheel).
pub const NVRTC_PATH_ENV: &str = "KEYFUSE_NVRTC_PATH";

/// Architecture used to compile without a device (the oldest that CUDA 13 supports).
pub const CHECK_ARCH: &str = "compute_75";

/// Libraries opened by [`preload_nvrtc`], kept loaded for the life of the process.
static PRELOADED: Mutex<Vec<(String, libloading::Library)>> = Mutex::new(Vec::new());

/// Load NVRTC from an explicit path, globally, before cudarc looks for it.
///
/// cudarc opens `libnvrtc.so.13` by name; the dynamic loader answers such a request with an
/// already-loaded library of that soname, so loading the wheel's file first makes cudarc use it
/// without touching `LD_LIBRARY_PATH` (which the loader only reads at process start).
/// Calling it again with the same path is a no-op.
pub fn preload_nvrtc(path: &Path) -> std::result::Result<(), String> {
    let key = path.display().to_string();
    let mut loaded = PRELOADED
        .lock()
        .map_err(|_| "preload lock poisoned".to_string())?;
    if loaded.iter().any(|(p, _)| *p == key) {
        return Ok(());
    }
    #[cfg(unix)]
    let lib = unsafe {
        use libloading::os::unix::{Library, RTLD_GLOBAL, RTLD_NOW};
        Library::open(Some(path), RTLD_NOW | RTLD_GLOBAL).map(libloading::Library::from)
    };
    #[cfg(not(unix))]
    let lib = unsafe { libloading::Library::new(path) };
    let lib = lib.map_err(|e| format!("cannot load {key}: {e}"))?;
    loaded.push((key, lib));
    Ok(())
}

/// The NVRTC path that was preloaded (by [`preload_nvrtc`] or `KEYFUSE_NVRTC_PATH`), if any.
pub fn preloaded_nvrtc() -> Option<String> {
    preload_from_env();
    PRELOADED.lock().ok()?.first().map(|(p, _)| p.clone())
}

fn preload_from_env() {
    static ONCE: OnceLock<()> = OnceLock::new();
    ONCE.get_or_init(|| {
        if let Some(p) = std::env::var_os(NVRTC_PATH_ENV) {
            // a wrong path is reported by the probe as "NVRTC not found"
            let _ = preload_nvrtc(Path::new(&p));
        }
    });
}

/// Whether the CUDA driver library (libcuda) can be opened. Never panics.
pub fn driver_present() -> bool {
    quietly(|| unsafe { cudarc::driver::sys::is_culib_present() }).unwrap_or(false)
}

/// Whether the NVRTC library can be opened (after any preload). Never panics.
pub fn nvrtc_present() -> bool {
    preload_from_env();
    quietly(|| unsafe { cudarc::nvrtc::sys::is_culib_present() }).unwrap_or(false)
}

/// Compile the whole kernel module to PTX for `arch` (e.g. `"compute_90"`).
///
/// `fmad=false`: every `a * b + c` rounds twice, like the CPU reference, for parity.
pub fn compile_module(arch: &'static str) -> std::result::Result<Ptx, String> {
    if !nvrtc_present() {
        return Err(format!(
            "NVRTC library not found (install the nvidia-cuda-nvrtc wheel, or set \
             {NVRTC_PATH_ENV} / LD_LIBRARY_PATH)"
        ));
    }
    let opts = CompileOptions {
        fmad: Some(false),
        arch: Some(arch),
        name: Some("keyfuse_kernels.cu".into()),
        ..Default::default()
    };
    let source = module_source();
    quietly(AssertUnwindSafe(|| compile_ptx_with_opts(&source, opts)))
        .map_err(|_| "NVRTC panicked while compiling the keyfuse kernels".to_string())?
        .map_err(|e| match e {
            cudarc::nvrtc::CompileError::CompileError { log, .. } => {
                format!(
                    "NVRTC failed to compile the keyfuse kernels:\n{}",
                    log.to_string_lossy()
                )
            }
            other => format!("NVRTC error: {other:?}"),
        })
}

/// Compile the whole kernel module to a CUBIN (machine code) for a real architecture
/// (e.g. `"sm_90"`). Loading machine code needs no PTX JIT, so a wheel NVRTC newer than the
/// installed driver (same CUDA major) still works, where its PTX could be refused as too new.
pub fn compile_cubin(arch: &str) -> std::result::Result<Vec<u8>, String> {
    use cudarc::nvrtc::{result, sys};
    use std::ffi::CString;
    if !nvrtc_present() {
        return Err(format!(
            "NVRTC library not found (install the nvidia-cuda-nvrtc wheel, or set \
             {NVRTC_PATH_ENV} / LD_LIBRARY_PATH)"
        ));
    }
    let src = CString::new(module_source()).map_err(|e| e.to_string())?;
    let name = CString::new("keyfuse_kernels.cu").expect("no NUL");
    let options = vec![
        "--fmad=false".to_string(),
        format!("--gpu-architecture={arch}"),
    ];
    quietly(AssertUnwindSafe(|| unsafe {
        let prog = result::create_program(&src, Some(&name)).map_err(|e| e.to_string())?;
        let out = (|| {
            if let Err(e) = result::compile_program(prog, &options) {
                let log = result::get_program_log(prog).unwrap_or_default();
                let log: Vec<u8> = log
                    .iter()
                    .map(|&c| c as u8)
                    .take_while(|&c| c != 0)
                    .collect();
                return Err(format!(
                    "NVRTC failed to compile the keyfuse kernels ({e}):\n{}",
                    String::from_utf8_lossy(&log)
                ));
            }
            let mut size = 0usize;
            sys::nvrtcGetCUBINSize(prog, &mut size)
                .result()
                .map_err(|e| e.to_string())?;
            let mut buf = vec![0u8; size];
            sys::nvrtcGetCUBIN(prog, buf.as_mut_ptr().cast())
                .result()
                .map_err(|e| e.to_string())?;
            Ok(buf)
        })();
        let _ = result::destroy_program(prog);
        out
    }))
    .map_err(|_| "NVRTC panicked while compiling the keyfuse kernels".to_string())?
}

/// Compile every kernel without a device — to PTX for the oldest supported architecture
/// (checking each entry point is there) and to machine code for an H100 (`sm_90`, the
/// path the probe takes) — and return the PTX size in bytes. Used by the test suite on
/// machines with no GPU.
pub fn compile_check() -> std::result::Result<usize, String> {
    let ptx = compile_module(CHECK_ARCH)?;
    let text = ptx.to_src();
    for name in KERNEL_NAMES {
        if !text.contains(&format!(".entry {name}(")) {
            return Err(format!("kernel {name} missing from the compiled PTX"));
        }
    }
    let cubin = compile_cubin("sm_90")?;
    if cubin.len() < 1000 || !cubin.starts_with(b"\x7fELF") {
        return Err("NVRTC returned no sm_90 machine code".into());
    }
    Ok(text.len())
}

/// A usable device: its context, a stream, and the compiled kernel module.
pub struct Gpu {
    pub(crate) ctx: Arc<CudaContext>,
    pub(crate) stream: Arc<CudaStream>,
    module: Arc<CudaModule>,
    /// Device name as the driver reports it.
    pub name: String,
    /// Compute capability (major, minor).
    pub compute_capability: (i32, i32),
    /// Number of streaming multiprocessors (to size grids).
    pub sm_count: usize,
    /// Total device memory in bytes.
    pub total_memory: usize,
}

impl Gpu {
    /// The device's CUDA context (for callers that manage their own buffers).
    pub fn context(&self) -> &Arc<CudaContext> {
        &self.ctx
    }

    /// Wait for all queued work on the device.
    pub fn synchronize(&self) -> Result<()> {
        self.stream.synchronize().map_err(dev_err)
    }

    /// A kernel of the module by name.
    pub(crate) fn func(&self, name: &str) -> Result<CudaFunction> {
        self.module
            .load_function(name)
            .map_err(|e| KfError::DeviceUnavailable(format!("kernel {name}: {e}")))
    }
}

fn probe() -> std::result::Result<Gpu, String> {
    if !driver_present() {
        return Err("CUDA driver library (libcuda) not found".into());
    }
    if !nvrtc_present() {
        return Err(format!(
            "NVRTC library not found (install the nvidia-cuda-nvrtc wheel, or set \
             {NVRTC_PATH_ENV} / LD_LIBRARY_PATH)"
        ));
    }
    let count = CudaContext::device_count().map_err(|e| format!("CUDA driver: {e}"))?;
    if count <= 0 {
        return Err("no CUDA device found".into());
    }
    let ctx = CudaContext::new(0).map_err(|e| format!("cannot create a CUDA context: {e}"))?;
    let name = ctx.name().map_err(|e| e.to_string())?;
    let (major, minor) = ctx.compute_capability().map_err(|e| e.to_string())?;
    let sm_count = ctx
        .attribute(
            cudarc::driver::sys::CUdevice_attribute::CU_DEVICE_ATTRIBUTE_MULTIPROCESSOR_COUNT,
        )
        .map_err(|e| e.to_string())?
        .max(1) as usize;
    let total_memory = ctx.total_mem().map_err(|e| e.to_string())?;
    // machine code for this device first (no driver JIT); PTX as the fallback
    let module = match compile_cubin(&format!("sm_{major}{minor}")) {
        Ok(cubin) => ctx.load_module(Ptx::from_binary(cubin)),
        Err(_) => {
            // NVRTC wants a 'static arch string; this runs once per process.
            let arch: &'static str = Box::leak(format!("compute_{major}{minor}").into_boxed_str());
            ctx.load_module(compile_module(arch)?)
        }
    }
    .map_err(|e| format!("cannot load the kernels on {name}: {e}"))?;
    let stream = ctx.default_stream();
    Ok(Gpu {
        ctx,
        stream,
        module,
        name,
        compute_capability: (major, minor),
        sm_count,
        total_memory,
    })
}

/// Makes `buffer`'s context current on this thread before the buffer is dropped.
///
/// cudarc frees device memory (`cuMemFreeAsync`) without making the context current, and
/// on a thread where it is not current (the Python thread dropping a `GpuCohort`, say) the
/// free fails with `CUDA_ERROR_INVALID_CONTEXT`, which cudarc keeps as the context's
/// error: every later GPU call of the process then fails. Owners of device buffers that
/// can be dropped on any thread call this in their `Drop`.
pub(crate) fn bind_before_free<T>(buffer: &CudaSlice<T>) {
    // a failure here is recorded by the free that follows
    let _ = buffer.context().bind_to_thread();
}

static GPU: OnceLock<std::result::Result<Gpu, String>> = OnceLock::new();

fn probe_cached() -> &'static std::result::Result<Gpu, String> {
    GPU.get_or_init(|| {
        quietly(probe).unwrap_or_else(|_| {
            Err("the CUDA probe panicked (driver or NVRTC too old for CUDA 13?)".into())
        })
    })
}

/// The process's GPU, probed and compiled on first use; `DeviceUnavailable` with the reason
/// when there is none.
pub fn gpu() -> Result<&'static Gpu> {
    probe_cached()
        .as_ref()
        .map_err(|reason| KfError::DeviceUnavailable(reason.clone()))
}

/// True when a device answers and the kernels compiled and loaded.
pub fn cuda_available() -> bool {
    probe_cached().is_ok()
}

/// What the probe found, for diagnostics (`keyfuse._core.cuda_info()`).
#[derive(Clone, Debug)]
pub struct CudaInfo {
    pub available: bool,
    pub driver_found: bool,
    pub nvrtc_found: bool,
    pub nvrtc_path: Option<String>,
    pub device_name: Option<String>,
    pub compute_capability: Option<(i32, i32)>,
    pub sm_count: Option<usize>,
    pub total_memory: Option<usize>,
    /// Why the GPU is unavailable (None when available).
    pub reason: Option<String>,
}

/// Probe (once) and describe the outcome.
pub fn cuda_info() -> CudaInfo {
    let probed = probe_cached();
    let driver_found = driver_present();
    let nvrtc_found = nvrtc_present();
    match probed {
        Ok(g) => CudaInfo {
            available: true,
            driver_found,
            nvrtc_found,
            nvrtc_path: preloaded_nvrtc(),
            device_name: Some(g.name.clone()),
            compute_capability: Some(g.compute_capability),
            sm_count: Some(g.sm_count),
            total_memory: Some(g.total_memory),
            reason: None,
        },
        Err(reason) => CudaInfo {
            available: false,
            driver_found,
            nvrtc_found,
            nvrtc_path: preloaded_nvrtc(),
            device_name: None,
            compute_capability: None,
            sm_count: None,
            total_memory: None,
            reason: Some(reason.clone()),
        },
    }
}

/// Map a driver error onto the core error type.
pub(crate) fn dev_err(e: impl std::fmt::Display) -> KfError {
    KfError::DeviceUnavailable(format!("CUDA error: {e}"))
}

#[cfg(test)]
mod tests {
    use super::*;

    /// NVRTC compiles every kernel (needs NVRTC: the pip wheel through KEYFUSE_NVRTC_PATH, or
    /// a CUDA install; without either it reports and passes, and pytest's compile test runs
    /// it against the wheel).
    #[test]
    fn kernels_compile_with_nvrtc() {
        if !nvrtc_present() {
            eprintln!("NVRTC not found: kernel compile check skipped");
            return;
        }
        let bytes = compile_check().unwrap_or_else(|e| panic!("{e}"));
        eprintln!(
            "all {} kernels compiled: {bytes} bytes of PTX",
            crate::kernels::KERNEL_NAMES.len()
        );
        assert!(bytes > 1000);
    }

    /// A panic inside a (nested) quiet section is caught and the sections do not deadlock.
    #[test]
    fn quiet_sections_catch_nested_panics() {
        let inner = quietly(|| quietly(|| -> u8 { panic!("no libcuda") }).is_err());
        assert!(matches!(inner, Ok(true)));
        assert!(quietly(|| 7).is_ok());
    }

    /// The probe never panics and agrees with itself.
    #[test]
    fn probe_is_stable() {
        let first = cuda_available();
        assert_eq!(first, cuda_available());
        let info = cuda_info();
        assert_eq!(info.available, first);
        assert_eq!(info.reason.is_none(), first);
        if !first {
            assert!(matches!(gpu(), Err(KfError::DeviceUnavailable(_))));
        }
    }
}
