//! Settles promises from tokio in batches. napi-rs's `spawn_future` makes one threadsafe
//! function (a libuv handle) per call; here one per Node environment carries every
//! completion, and one wake-up of the main thread settles all that are ready.

use std::cell::RefCell;
use std::ffi::c_void;
use std::future::Future;
use std::ptr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use napi::bindgen_prelude::{PromiseRaw, ToNapiValue};
use napi::{sys, Env, JsValue};
use parking_lot::Mutex;

use super::errors::js_error;
use crate::error::Error;

type Settle = Box<dyn FnOnce(&Env) -> Result<sys::napi_value, sys::napi_value> + Send>;

struct Completion {
    deferred: Deferred,
    settle: Settle,
}

/// `napi_deferred` is only touched on the main thread; it rides along in the queue.
struct Deferred(sys::napi_deferred);
unsafe impl Send for Deferred {}

struct Tsfn(sys::napi_threadsafe_function);
unsafe impl Send for Tsfn {}
unsafe impl Sync for Tsfn {}

struct Dispatcher {
    tsfn: Tsfn,
    queue: Mutex<Vec<Completion>>,
    closed: AtomicBool,
}

impl Dispatcher {
    fn complete(&self, completion: Completion) {
        // The queue lock is held from the `closed` check through the call: `cleanup` takes it
        // to close and release the threadsafe function, so no call can reach a function its
        // environment has freed (a worker terminated mid-query: libuv aborts on the freed
        // mutex otherwise). Node runs the JS side of the call outside its own lock, so
        // `drain` taking this lock cannot deadlock.
        let mut queue = self.queue.lock();
        if self.closed.load(Ordering::Acquire) {
            drop(queue);
            return; // the environment is gone; the completion is dropped here
        }
        queue.push(completion);
        if queue.len() == 1 {
            // Wake the main thread once; it drains everything queued by then.
            unsafe {
                sys::napi_call_threadsafe_function(
                    self.tsfn.0,
                    ptr::null_mut(),
                    sys::ThreadsafeFunctionCallMode::nonblocking,
                )
            };
        }
    }
}

/// Main-thread state: the dispatcher and how many promises are still pending.
struct Local {
    env: sys::napi_env,
    dispatcher: Arc<Dispatcher>,
    pending: usize,
}

thread_local! {
    static LOCAL: RefCell<Option<Local>> = const { RefCell::new(None) };
}

unsafe extern "C" fn drain(
    env: sys::napi_env,
    _js_cb: sys::napi_value,
    context: *mut c_void,
    _data: *mut c_void,
) {
    if env.is_null() {
        return;
    }
    let dispatcher = unsafe { &*(context as *const Dispatcher) };
    let ready = std::mem::take(&mut *dispatcher.queue.lock());
    let count = ready.len();
    let wrapped = Env::from_raw(env);
    for completion in ready {
        let mut scope = ptr::null_mut();
        unsafe { sys::napi_open_handle_scope(env, &mut scope) };
        match (completion.settle)(&wrapped) {
            Ok(value) => unsafe { sys::napi_resolve_deferred(env, completion.deferred.0, value) },
            Err(error) => unsafe { sys::napi_reject_deferred(env, completion.deferred.0, error) },
        };
        unsafe { sys::napi_close_handle_scope(env, scope) };
    }
    LOCAL.with(|l| {
        if let Some(local) = l.borrow_mut().as_mut() {
            local.pending = local.pending.saturating_sub(count);
            if local.pending == 0 {
                // Nothing in flight: don't keep the process alive.
                unsafe { sys::napi_unref_threadsafe_function(env, local.dispatcher.tsfn.0) };
            }
        }
    });
}

unsafe extern "C" fn finalize(_env: sys::napi_env, data: *mut c_void, _hint: *mut c_void) {
    drop(unsafe { Arc::from_raw(data as *const Dispatcher) });
}

unsafe extern "C" fn cleanup(arg: *mut c_void) {
    let dispatcher = unsafe { &*(arg as *const Dispatcher) };
    let pending = {
        let mut queue = dispatcher.queue.lock();
        dispatcher.closed.store(true, Ordering::Release);
        unsafe {
            sys::napi_release_threadsafe_function(
                dispatcher.tsfn.0,
                sys::ThreadsafeFunctionReleaseMode::abort,
            )
        };
        std::mem::take(&mut *queue)
    };
    // Completions that will never be drained: dropped outside the lock.
    drop(pending);
    LOCAL.with(|l| l.borrow_mut().take());
}

fn dispatcher(env: &Env) -> napi::Result<Arc<Dispatcher>> {
    let raw_env = env.raw();
    if let Some(d) = LOCAL.with(|l| {
        l.borrow()
            .as_ref()
            .filter(|x| x.env == raw_env)
            .map(|x| Arc::clone(&x.dispatcher))
    }) {
        return Ok(d);
    }
    let mut name = ptr::null_mut();
    let label = "quartermaster.completions";
    unsafe {
        sys::napi_create_string_utf8(
            raw_env,
            label.as_ptr().cast(),
            label.len() as isize,
            &mut name,
        )
    };
    // The dispatcher's address is fixed before the threadsafe function exists; fill it after.
    let dispatcher = Arc::new(Dispatcher {
        tsfn: Tsfn(ptr::null_mut()),
        queue: Mutex::new(Vec::new()),
        closed: AtomicBool::new(false),
    });
    let mut tsfn = ptr::null_mut();
    let context = Arc::into_raw(Arc::clone(&dispatcher)) as *mut c_void;
    let status = unsafe {
        sys::napi_create_threadsafe_function(
            raw_env,
            ptr::null_mut(),
            ptr::null_mut(),
            name,
            0,
            1,
            context,
            Some(finalize),
            context,
            Some(drain),
            &mut tsfn,
        )
    };
    if status != sys::Status::napi_ok {
        drop(unsafe { Arc::from_raw(context as *const Dispatcher) });
        return Err(napi::Error::from_reason(
            "could not create the completion channel",
        ));
    }
    // Safe: no other thread has seen `dispatcher` yet.
    let dispatcher = unsafe {
        let raw = Arc::as_ptr(&dispatcher) as *mut Dispatcher;
        (*raw).tsfn = Tsfn(tsfn);
        dispatcher
    };
    unsafe {
        sys::napi_unref_threadsafe_function(raw_env, tsfn);
        sys::napi_add_env_cleanup_hook(
            raw_env,
            Some(cleanup),
            Arc::as_ptr(&dispatcher) as *mut c_void,
        );
    }
    LOCAL.with(|l| {
        *l.borrow_mut() = Some(Local {
            env: raw_env,
            dispatcher: Arc::clone(&dispatcher),
            pending: 0,
        })
    });
    Ok(dispatcher)
}

fn error_value(env: &Env, err: napi::Error) -> sys::napi_value {
    match env.create_error(err) {
        Ok(obj) => obj.raw(),
        Err(_) => {
            let mut undefined = ptr::null_mut();
            unsafe { sys::napi_get_undefined(env.raw(), &mut undefined) };
            undefined
        }
    }
}

/// Settles one promise; callable from any thread.
pub(crate) type Complete<T> = Box<dyn FnOnce(Result<T, Error>) + Send>;

type MakeSettle<T> = Box<dyn FnOnce(Result<T, Error>) -> Settle + Send>;

/// Settles its promise exactly once: with the outcome it is given, or — dropped without
/// one (a task that panicked) — with `INTERNAL`, so no promise stays pending forever and
/// keeps Node alive.
struct Settler<T> {
    dispatcher: Arc<Dispatcher>,
    deferred: Option<Deferred>,
    make: Option<MakeSettle<T>>,
}

impl<T> Settler<T> {
    fn settle(mut self, out: Result<T, Error>) {
        self.finish(out);
    }

    fn finish(&mut self, out: Result<T, Error>) {
        if let (Some(deferred), Some(make)) = (self.deferred.take(), self.make.take()) {
            self.dispatcher.complete(Completion {
                deferred,
                settle: make(out),
            });
        }
    }
}

impl<T> Drop for Settler<T> {
    fn drop(&mut self) {
        self.finish(Err(Error::internal(
            "the operation ended without an outcome (a bug); it may or may not have run",
        )));
    }
}

/// A promise and the one-shot function that settles it from any thread: `Ok` through
/// `convert` on the main thread, `Err` as a coded JS error.
pub(crate) fn promise<'env, T, V, C>(
    env: &'env Env,
    convert: C,
) -> napi::Result<(Complete<T>, PromiseRaw<'env, V>)>
where
    T: Send + 'static,
    V: ToNapiValue + 'static,
    C: FnOnce(&Env, T) -> napi::Result<V> + Send + 'static,
{
    let dispatcher = dispatcher(env)?;
    let raw_env = env.raw();
    let (deferred, promise) = new_promise(raw_env)?;
    LOCAL.with(|l| {
        if let Some(local) = l.borrow_mut().as_mut() {
            if local.pending == 0 {
                unsafe { sys::napi_ref_threadsafe_function(raw_env, local.dispatcher.tsfn.0) };
            }
            local.pending += 1;
        }
    });
    let make: MakeSettle<T> = Box::new(move |out: Result<T, Error>| {
        Box::new(move |env: &Env| match out {
            Ok(value) => {
                match convert(env, value).and_then(|v| unsafe { V::to_napi_value(env.raw(), v) }) {
                    Ok(js) => Ok(js),
                    Err(e) => Err(error_value(env, e)),
                }
            }
            Err(err) => Err(error_value(env, js_error(env, err))),
        })
    });
    let settler = Settler {
        dispatcher,
        deferred: Some(Deferred(deferred)),
        make: Some(make),
    };
    let complete = move |out: Result<T, Error>| settler.settle(out);
    Ok((Box::new(complete), PromiseRaw::new(raw_env, promise)))
}

fn new_promise(env: sys::napi_env) -> napi::Result<(sys::napi_deferred, sys::napi_value)> {
    let mut deferred = ptr::null_mut();
    let mut promise = ptr::null_mut();
    if unsafe { sys::napi_create_promise(env, &mut deferred, &mut promise) } != sys::Status::napi_ok
    {
        return Err(napi::Error::from_reason("could not create a promise"));
    }
    Ok((deferred, promise))
}

/// A promise settled already, for outcomes known on the main thread (no thread hop):
/// `Ok` resolves, `Err` rejects with the coded JS error.
pub(crate) fn settled<'env, V: ToNapiValue>(
    env: &'env Env,
    outcome: Result<V, Error>,
) -> napi::Result<PromiseRaw<'env, V>> {
    let raw_env = env.raw();
    let (deferred, promise) = new_promise(raw_env)?;
    let js = match outcome {
        Ok(value) => unsafe { V::to_napi_value(raw_env, value) }.map_err(|e| error_value(env, e)),
        Err(err) => Err(error_value(env, js_error(env, err))),
    };
    match js {
        Ok(value) => unsafe { sys::napi_resolve_deferred(raw_env, deferred, value) },
        Err(error) => unsafe { sys::napi_reject_deferred(raw_env, deferred, error) },
    };
    Ok(PromiseRaw::new(raw_env, promise))
}

/// Runs an owned future on the tokio runtime and settles a promise with its result. The
/// future must own what it uses — never a borrow of a `#[napi]` object (a terminated worker
/// would free it mid-await).
pub(crate) fn spawn<'env, T, V, F, C>(
    env: &'env Env,
    fut: F,
    convert: C,
) -> napi::Result<PromiseRaw<'env, V>>
where
    T: Send + 'static,
    V: ToNapiValue + 'static,
    F: Future<Output = Result<T, Error>> + Send + 'static,
    C: FnOnce(&Env, T) -> napi::Result<V> + Send + 'static,
{
    let (complete, promise) = promise(env, convert)?;
    super::runtime().spawn(async move { complete(fut.await) });
    Ok(promise)
}
