// The few c10d calls cps3d needs, as C functions for Rust: a TCPStore rendezvous, a Gloo
// process group (CPU tensors), an NCCL one (CUDA tensors; only when build.rs finds
// libtorch_cuda.so and nccl.h, which defines USE_C10D_NCCL), and all-reduce (sum),
// all-gather, broadcast and barrier, each waited on with a timeout. Tensors are tch's
// (`at::Tensor*`). Errors never cross into Rust as exceptions: they are written into `err`
// and the call returns non-zero (or null).
#include <ATen/ATen.h>
#include <torch/csrc/distributed/c10d/PrefixStore.hpp>
#include <torch/csrc/distributed/c10d/ProcessGroupGloo.hpp>
#include <torch/csrc/distributed/c10d/TCPStore.hpp>
#ifdef USE_C10D_NCCL
#include <torch/csrc/distributed/c10d/ProcessGroupNCCL.hpp>
#endif

#include <cstdlib>
#include <cstring>
#include <exception>
#include <stdexcept>
#include <string>
#include <vector>

struct cps3d_store {
  c10::intrusive_ptr<c10d::Store> store;
};

struct cps3d_pg {
  c10::intrusive_ptr<c10d::Backend> backend;
};

namespace {
void put_error(char* err, size_t n, const std::string& message) {
  if (err == nullptr || n == 0) return;
  size_t k = std::min(n - 1, message.size());
  std::memcpy(err, message.data(), k);
  err[k] = '\0';
}

// c10::Error's what() carries a C++ backtrace; its message alone says what happened.
std::string message_of(const std::exception& e) {
  if (auto c = dynamic_cast<const c10::Error*>(&e)) return c->msg();
  return e.what();
}

template <typename F>
int guarded(char* err, size_t n, F f) {
  try {
    f();
    return 0;
  } catch (const std::exception& e) {
    put_error(err, n, message_of(e));
  } catch (...) {
    put_error(err, n, "unknown C++ exception");
  }
  return 1;
}

std::vector<at::Tensor> tensors(at::Tensor** ts, int count) {
  std::vector<at::Tensor> v;
  v.reserve(count);
  for (int i = 0; i < count; i++) v.push_back(*ts[i]);
  return v;
}

void wait(const c10::intrusive_ptr<c10d::Work>& work, int64_t timeout_ms) {
  work->wait(std::chrono::milliseconds(timeout_ms));
}

// A collective's own timeout: NCCL's watchdog aborts the process when it passes, so it is
// set two minutes past the timed wait, whose error (naming the stopped rank) comes first.
std::chrono::milliseconds op_timeout(const cps3d_pg* pg, int64_t timeout_ms) {
  auto t = std::chrono::milliseconds(timeout_ms);
  return pg->backend->getBackendName() == "nccl" ? t + std::chrono::minutes(2) : t;
}

// Where this rank's Gloo connections bind, as PyTorch chooses: the interfaces
// GLOO_SOCKET_IFNAME names, the loopback address for a run on this machine, else the
// address this host's own name resolves to (never the master's: other nodes cannot bind it).
void add_gloo_devices(c10d::ProcessGroupGloo::Options& options, const std::string& master) {
  const char* ifnames = std::getenv("GLOO_SOCKET_IFNAME");
  if (ifnames != nullptr && *ifnames != '\0') {
    std::string list(ifnames);
    size_t start = 0;
    while (start <= list.size()) {
      size_t end = list.find(',', start);
      if (end == std::string::npos) end = list.size();
      if (end > start) {
        options.devices.push_back(c10d::ProcessGroupGloo::createDeviceForInterface(list.substr(start, end - start)));
      }
      start = end + 1;
    }
    return;
  }
  if (master == "127.0.0.1" || master == "localhost" || master == "::1") {
    options.devices.push_back(c10d::ProcessGroupGloo::createDeviceForHostname("127.0.0.1"));
    return;
  }
  options.devices.push_back(c10d::ProcessGroupGloo::createDefaultDevice());
}
}  // namespace

extern "C" {

// Rank 0 serves the store; the others connect, all waiting for the whole world.
// With `agent` (torchrun's own store, TORCHELASTIC_USE_AGENT_STORE) every rank is a client.
cps3d_store* cps3d_store_tcp(const char* host, int port, int rank, int world, int agent, int64_t timeout_ms,
                             char* err, size_t n) {
  cps3d_store* out = nullptr;
  guarded(err, n, [&] {
    c10d::TCPStoreOptions o;
    o.port = static_cast<uint16_t>(port);
    o.isServer = rank == 0 && !agent;
    o.numWorkers = world;
    o.waitWorkers = !agent;
    o.timeout = std::chrono::milliseconds(timeout_ms);
    out = new cps3d_store{c10::make_intrusive<c10d::TCPStore>(std::string(host), o)};
  });
  return out;
}

void cps3d_store_free(cps3d_store* s) { delete s; }

// The counter `key` plus `by` (by 0 reads it without waiting); the new value in `out`.
int cps3d_store_add(cps3d_store* s, const char* key, int64_t by, int64_t* out, char* err, size_t n) {
  return guarded(err, n, [&] { *out = s->store->add(std::string(key), by); });
}

int cps3d_store_set(cps3d_store* s, const char* key, const char* value, char* err, size_t n) {
  return guarded(err, n, [&] {
    std::string v(value);
    s->store->set(std::string(key), std::vector<uint8_t>(v.begin(), v.end()));
  });
}

// The value of `key` into `value` (NUL-terminated, cut to `len`); 1 in `found` when the key
// exists, without waiting for it otherwise.
int cps3d_store_get(cps3d_store* s, const char* key, char* value, size_t len, int* found, char* err, size_t n) {
  return guarded(err, n, [&] {
    *found = 0;
    if (!s->store->check({std::string(key)})) return;
    auto v = s->store->get(std::string(key));
    put_error(value, len, std::string(v.begin(), v.end()));
    *found = 1;
  });
}

// A Gloo group on the store under its own prefix (one store serves several groups:
// one per sibling network); `host` is the master's address (see add_gloo_devices).
cps3d_pg* cps3d_pg_gloo(cps3d_store* s, const char* prefix, const char* host, int rank, int world,
                        int64_t timeout_ms, char* err, size_t n) {
  cps3d_pg* pg = nullptr;
  guarded(err, n, [&] {
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), s->store);
    auto options = c10d::ProcessGroupGloo::Options::create(std::chrono::milliseconds(timeout_ms));
    add_gloo_devices(*options, std::string(host));
    pg = new cps3d_pg{c10::make_intrusive<c10d::ProcessGroupGloo>(store, rank, world, options)};
  });
  return pg;
}

// Whether this build has NCCL process groups.
int cps3d_has_nccl() {
#ifdef USE_C10D_NCCL
  return 1;
#else
  return 0;
#endif
}

// An NCCL group on the store under its own prefix. Its collectives run on NCCL's stream,
// ordered after the work already queued on the tensors' current stream (tch's), and the
// timed wait blocks the host until they are done or the timeout has passed: an error that
// names the stopped rank. NCCL's watchdog, which aborts the whole process at its own
// timeout, is given two minutes more, so that the error comes first.
cps3d_pg* cps3d_pg_nccl(cps3d_store* s, const char* prefix, int rank, int world, int64_t timeout_ms, char* err,
                        size_t n) {
  cps3d_pg* pg = nullptr;
  guarded(err, n, [&] {
#ifdef USE_C10D_NCCL
    auto store = c10::make_intrusive<c10d::PrefixStore>(std::string(prefix), s->store);
    auto options = c10d::ProcessGroupNCCL::Options::create();
    options->timeout = std::chrono::milliseconds(timeout_ms) + std::chrono::minutes(2);
    pg = new cps3d_pg{c10::make_intrusive<c10d::ProcessGroupNCCL>(store, rank, world, options)};
#else
    (void)s, (void)prefix, (void)rank, (void)world, (void)timeout_ms;
    throw std::runtime_error("this cps3d was built without NCCL (no libtorch_cuda.so or nccl.h at build time)");
#endif
  });
  return pg;
}

void cps3d_pg_free(cps3d_pg* pg) { delete pg; }

// One tensor: a list would be summed across its entries too (c10d's multi-device form);
// the caller flattens what it reduces into one buffer, as DDP's buckets do.
int cps3d_pg_allreduce_sum(cps3d_pg* pg, at::Tensor* t, int64_t timeout_ms, char* err, size_t n) {
  return guarded(err, n, [&] {
    std::vector<at::Tensor> v = {*t};
    c10d::AllreduceOptions o;
    o.reduceOp = c10d::ReduceOp::SUM;
    o.timeout = op_timeout(pg, timeout_ms);
    wait(pg->backend->allreduce(v, o), timeout_ms);
  });
}

int cps3d_pg_allgather(cps3d_pg* pg, at::Tensor* input, at::Tensor** outputs, int world, int64_t timeout_ms,
                       char* err, size_t n) {
  return guarded(err, n, [&] {
    std::vector<at::Tensor> in = {*input};
    std::vector<std::vector<at::Tensor>> out = {tensors(outputs, world)};
    c10d::AllgatherOptions o;
    o.timeout = op_timeout(pg, timeout_ms);
    wait(pg->backend->allgather(out, in, o), timeout_ms);
  });
}

int cps3d_pg_broadcast(cps3d_pg* pg, at::Tensor* t, int root, int64_t timeout_ms, char* err, size_t n) {
  return guarded(err, n, [&] {
    std::vector<at::Tensor> v = {*t};
    c10d::BroadcastOptions o;
    o.rootRank = root;
    o.timeout = op_timeout(pg, timeout_ms);
    wait(pg->backend->broadcast(v, o), timeout_ms);
  });
}

int cps3d_pg_barrier(cps3d_pg* pg, int64_t timeout_ms, char* err, size_t n) {
  return guarded(err, n, [&] {
    c10d::BarrierOptions o;
    o.timeout = op_timeout(pg, timeout_ms);
    wait(pg->backend->barrier(o), timeout_ms);
  });
}

}  // extern "C"
