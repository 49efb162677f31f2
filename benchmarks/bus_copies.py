"""How fast the copy engines move optimizer state between host RAM and the GPU,
by the kind of host memory it sits in: the figures that decide how a state in
host RAM is streamed (docs/memory.md, "State in host RAM").

Runs on the CUDA driver alone (ctypes, no JAX, so no memory pool is taken),
on `--gib` GiB buffers (never more than a quarter of free device memory):

- pinned host memory (cuMemAllocHost) <-> device memory: host-to-device and
  device-to-host alone, and both at once on two streams (the bus floor);
- managed memory whose pages are on the host (preferred location host,
  mapped for the GPU, as the library places state that does not fit) copied
  by cuMemcpyAsync to and from device memory, alone and at once;
- the same copies in chunks of `--chunk-mib`, as a streamed step issues them;
- the same two kinds of host memory copied by a kernel instead (the copy
  kernel of a streamed step reads and writes host pages through the GPU's
  mapping), both ways at once, by the number of CTAs each way and the loads
  each thread has in flight;
- managed memory moved by cuMemPrefetchAsync host -> device and back (what
  page_out and the step after it do);
- after a spike (plain device allocations until one fails, which makes the
  driver evict a resident managed buffer, then freed): the prefetch back, as
  one prefetch, after a prefetch to the host, and in four on four streams.

    python benchmarks/bus_copies.py --json out.json
"""

from __future__ import annotations

import argparse
import ctypes
import json
import time

MIB = 1 << 20
GIB = 1 << 30

DEVICE, HOST = 1, 2  # CU_MEM_LOCATION_TYPE_*
PREFERRED, ACCESSED_BY = 3, 5  # CU_MEM_ADVISE_SET_*


class Location(ctypes.Structure):
  _fields_ = [("type", ctypes.c_int), ("id", ctypes.c_int)]


class Driver:
  def __init__(self):
    self.lib = ctypes.CDLL("libcuda.so.1")
    self.call("cuInit", 0)
    dev = ctypes.c_int()
    self.call("cuDeviceGet", ctypes.byref(dev), 0)
    ctx = ctypes.c_void_p()
    self.call("cuDevicePrimaryCtxRetain", ctypes.byref(ctx), dev)
    self.call("cuCtxSetCurrent", ctx)

  def call(self, name, *args):
    result = getattr(self.lib, name)(*args)
    if result != 0:
      raise RuntimeError(f"{name} failed with CUresult {result}")

  def free_memory(self):
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    self.call("cuMemGetInfo_v2", ctypes.byref(free), ctypes.byref(total))
    return free.value

  def stream(self):
    s = ctypes.c_void_p()
    self.call("cuStreamCreate", ctypes.byref(s), 1)
    return s

  def device(self, n):
    p = ctypes.c_uint64()
    self.call("cuMemAlloc_v2", ctypes.byref(p), ctypes.c_size_t(n))
    return p.value

  def pinned(self, n):
    p = ctypes.c_void_p()
    self.call("cuMemAllocHost_v2", ctypes.byref(p), ctypes.c_size_t(n))
    ctypes.memset(p, 1, n)
    return p.value

  def managed(self, n, home):
    p = ctypes.c_uint64()
    self.call("cuMemAllocManaged", ctypes.byref(p), ctypes.c_size_t(n), 1)
    loc = Location(home, 0)
    self.call("cuMemAdvise_v2", ctypes.c_uint64(p.value), ctypes.c_size_t(n), PREFERRED, loc)
    self.call(
      "cuMemAdvise_v2",
      ctypes.c_uint64(p.value),
      ctypes.c_size_t(n),
      ACCESSED_BY,
      Location(DEVICE, 0),
    )
    return p.value

  def copy(self, dst, src, n, stream):
    self.call(
      "cuMemcpyAsync", ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_size_t(n), stream
    )

  def prefetch(self, p, n, where, stream):
    self.call(
      "cuMemPrefetchAsync_v2", ctypes.c_uint64(p), ctypes.c_size_t(n), Location(where, 0), 0, stream
    )

  def sync(self, *streams):
    for s in streams:
      self.call("cuStreamSynchronize", s)


# A copy kernel like the library's (csrc/cuda_kernels.cu, CopyWords): 16-byte
# words, a grid-stride loop, UNROLL loads in flight per thread before its stores.
COPY_KERNEL = r"""
template <int kUnroll>
__device__ void Copy(uint4* to, const uint4* from, long long words) {
  long long threads = (long long)gridDim.x * blockDim.x;
  long long i = (long long)blockIdx.x * blockDim.x + threadIdx.x;
  for (; i + (kUnroll - 1) * threads < words; i += kUnroll * threads) {
    uint4 w[kUnroll];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) w[k] = from[i + k * threads];
#pragma unroll
    for (int k = 0; k < kUnroll; ++k) to[i + k * threads] = w[k];
  }
  for (; i < words; i += threads) to[i] = from[i];
}
extern "C" __global__ void copy4(uint4* to, const uint4* from, long long words) {
  Copy<4>(to, from, words);
}
extern "C" __global__ void copy8(uint4* to, const uint4* from, long long words) {
  Copy<8>(to, from, words);
}
"""


class CopyKernels:
  """COPY_KERNEL compiled by NVRTC (the library's own, found as it finds it)."""

  def __init__(self, drv):
    from nvrtc_cubin import nvrtc_compile  # the library's NVRTC; no backend is started

    major, minor = ctypes.c_int(), ctypes.c_int()
    dev = ctypes.c_int()
    drv.call("cuDeviceGet", ctypes.byref(dev), 0)
    drv.call("cuDeviceGetAttribute", ctypes.byref(major), 75, dev)
    drv.call("cuDeviceGetAttribute", ctypes.byref(minor), 76, dev)
    self.sms = ctypes.c_int()
    drv.call("cuDeviceGetAttribute", ctypes.byref(self.sms), 16, dev)
    self.sms = self.sms.value
    cubin = nvrtc_compile(COPY_KERNEL.encode(), "copy.cu", major.value * 10 + minor.value)
    module = ctypes.c_void_p()
    drv.call("cuModuleLoadData", ctypes.byref(module), cubin)
    self.drv, self.functions = drv, {}
    for unroll in (4, 8):
      f = ctypes.c_void_p()
      drv.call("cuModuleGetFunction", ctypes.byref(f), module, f"copy{unroll}".encode())
      self.functions[unroll] = f

  def copy(self, dst, src, n, stream, ctas, unroll=4):
    to, frm, words = ctypes.c_uint64(dst), ctypes.c_uint64(src), ctypes.c_longlong(n // 16)
    args = (ctypes.c_void_p * 3)(
      ctypes.addressof(to), ctypes.addressof(frm), ctypes.addressof(words)
    )
    self.drv.call(
      "cuLaunchKernel", self.functions[unroll], ctas, 1, 1, 256, 1, 1, 0, stream, args, None
    )


def timed(drv, streams, issue, repeats=3):
  """Median ms of `issue()` (which enqueues work) until `streams` are done."""
  times = []
  for _ in range(repeats):
    drv.sync(*streams)
    t0 = time.perf_counter()
    issue()
    drv.sync(*streams)
    times.append((time.perf_counter() - t0) * 1e3)
  return sorted(times)[len(times) // 2]


def main():
  parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
  parser.add_argument("--gib", type=float, default=2.03)
  parser.add_argument("--chunk-mib", type=int, nargs="+", default=[8, 32, 128])
  parser.add_argument("--json")
  args = parser.parse_args()
  drv = Driver()
  n = int(args.gib * GIB) // MIB * MIB
  free = drv.free_memory()
  if 4 * n > free:
    raise SystemExit(f"{n} bytes x 4 do not fit in {free} free bytes")
  s_in, s_out = drv.stream(), drv.stream()
  dev_a, dev_b = drv.device(n), drv.device(n)
  pin_a, pin_b = drv.pinned(n), drv.pinned(n)
  out = {"bytes": n, "free_bytes_at_start": free}

  def both(src_in, dst_out, chunk=None):
    def issue():
      step = chunk or n
      for at in range(0, n, step):
        k = min(step, n - at)
        drv.copy(dev_a + at, src_in + at, k, s_in)
        drv.copy(dst_out + at, dev_b + at, k, s_out)

    return issue

  out["pinned_h2d_ms"] = timed(drv, [s_in], lambda: drv.copy(dev_a, pin_a, n, s_in))
  out["pinned_d2h_ms"] = timed(drv, [s_out], lambda: drv.copy(pin_b, dev_b, n, s_out))
  out["pinned_both_ms"] = timed(drv, [s_in, s_out], both(pin_a, pin_b))
  for c in args.chunk_mib:
    out[f"pinned_both_chunks_{c}mib_ms"] = timed(drv, [s_in, s_out], both(pin_a, pin_b, c * MIB))

  # Managed memory homed on the host, touched there first (pages on the host).
  man_a, man_b = drv.managed(n, HOST), drv.managed(n, HOST)
  ctypes.memset(man_a, 1, n)
  ctypes.memset(man_b, 1, n)
  out["managed_host_h2d_ms"] = timed(drv, [s_in], lambda: drv.copy(dev_a, man_a, n, s_in))
  out["managed_host_d2h_ms"] = timed(drv, [s_out], lambda: drv.copy(man_b, dev_b, n, s_out))
  out["managed_host_both_ms"] = timed(drv, [s_in, s_out], both(man_a, man_b))
  for c in args.chunk_mib:
    out[f"managed_host_both_chunks_{c}mib_ms"] = timed(
      drv, [s_in, s_out], both(man_a, man_b, c * MIB)
    )
  # The same copies by a kernel through the GPU's mapping of the host pages.
  kernels = CopyKernels(drv)
  out["sms"] = kernels.sms
  by_kernel = {}
  for kind, (src, dst) in {"pinned": (pin_a, pin_b), "managed_host": (man_a, man_b)}.items():
    for unroll in (4, 8):
      for ctas in sorted({8, 16, 32, 64, kernels.sms}):

        def issue(src=src, dst=dst, ctas=ctas, unroll=unroll):
          kernels.copy(dev_a, src, n, s_in, ctas, unroll)
          kernels.copy(dst, dev_b, n, s_out, ctas, unroll)

        by_kernel[f"{kind}_both_unroll{unroll}_ctas{ctas}_ms"] = timed(drv, [s_in, s_out], issue)
    by_kernel[f"{kind}_h2d_unroll4_ctas32_ms"] = timed(
      drv, [s_in], lambda src=src: kernels.copy(dev_a, src, n, s_in, 32)
    )
    by_kernel[f"{kind}_d2h_unroll4_ctas32_ms"] = timed(
      drv, [s_out], lambda dst=dst: kernels.copy(dst, dev_b, n, s_out, 32)
    )
  out["kernel_copies"] = by_kernel
  # Still on the host after the copies? Reading it there again is as quick.
  t0 = time.perf_counter()
  ctypes.memset(man_a, 2, n)
  out["managed_host_memset_after_ms"] = (time.perf_counter() - t0) * 1e3

  # Managed memory homed on the device, moved by prefetch.
  man_d = drv.managed(n, DEVICE)
  drv.prefetch(man_d, n, DEVICE, s_in)
  drv.sync(s_in)
  outs, ins = [], []
  for _ in range(3):
    outs.append(timed(drv, [s_in], lambda: drv.prefetch(man_d, n, HOST, s_in), 1))
    ins.append(timed(drv, [s_in], lambda: drv.prefetch(man_d, n, DEVICE, s_in), 1))
  out["prefetch_to_host_ms"], out["prefetch_to_device_ms"] = outs, ins

  # Copies from managed memory homed on the device while its pages are on the host.
  drv.prefetch(man_d, n, HOST, s_in)
  drv.sync(s_in)
  out["paged_out_h2d_copy_ms"] = timed(drv, [s_in], lambda: drv.copy(dev_a, man_d, n, s_in), 1)
  drv.prefetch(man_d, n, DEVICE, s_in)
  drv.sync(s_in)

  # A spike: plain device allocations until one fails, then freed; then the
  # evicted buffer brought back three ways: one prefetch to the device, a
  # prefetch to the host first (gathering what the driver left in pieces),
  # and four prefetches of a quarter each on four streams.
  quarters = [drv.stream() for _ in range(4)]

  def back_in_quarters():
    q = n // 4
    for i, s in enumerate(quarters):
      drv.prefetch(man_d + i * q, q if i < 3 else n - 3 * q, DEVICE, s)

  spikes = []
  for way in ("prefetch", "prefetch", "host_first", "four_streams"):
    fill = []
    while True:
      p = ctypes.c_uint64()
      if drv.lib.cuMemAlloc_v2(ctypes.byref(p), ctypes.c_size_t(GIB)) != 0:
        break
      fill.append(p.value)
    if fill:  # leave the driver room, as FillDeviceMemory does
      drv.call("cuMemFree_v2", ctypes.c_uint64(fill.pop()))
    for p in fill:
      drv.call("cuMemFree_v2", ctypes.c_uint64(p))
    time.sleep(1.0)
    spike = {"spike_gib": len(fill) + 1, "way": way}
    if way == "host_first":
      spike["prefetch_to_host_ms"] = timed(
        drv, [s_in], lambda: drv.prefetch(man_d, n, HOST, s_in), 1
      )
    if way == "four_streams":
      spike["prefetch_back_ms"] = timed(drv, quarters, back_in_quarters, 1)
    else:
      spike["prefetch_back_ms"] = timed(
        drv, [s_in], lambda: drv.prefetch(man_d, n, DEVICE, s_in), 1
      )
    spike["prefetch_again_ms"] = timed(drv, [s_in], lambda: drv.prefetch(man_d, n, DEVICE, s_in), 1)
    spikes.append(spike)
  out["spikes"] = spikes
  print(json.dumps(out, indent=1))
  if args.json:
    with open(args.json, "w") as f:
      json.dump(out, f, indent=1)


if __name__ == "__main__":
  main()
