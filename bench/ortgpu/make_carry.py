"""Build the .ortgpu carry directory (onnxruntime-gpu for an H100, under 48 MB) from two wheels.

Development-environment workaround, not part of the library: see bench/ortgpu/README.md.

Get the wheels (any machine with pip and network; the same files are fetched whatever the
local Python version is, thanks to --python-version/--platform):

    python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
        --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
        -d DIR onnxruntime-gpu==1.31.1 zstandard==0.25.0

Then:

    python3 bench/ortgpu/make_carry.py \
        --wheel DIR/onnxruntime_gpu-1.31.1-cp312-cp312-manylinux_2_28_x86_64.whl \
        --zstandard-wheel DIR/zstandard-0.25.0-cp312-cp312-manylinux2014_x86_64.manylinux_2_17_x86_64.whl \
        --out .ortgpu

Needs Python 3.11+ (standard library only) and one zstd DEcompressor: the system libzstd
(libzstd.so.1, through ctypes), else Python 3.14's compression.zstd, else the `zstd` CLI.
Decompression is exact whatever its version; only the recompression done by restore.py on the
GPU machine must be zstd 1.5.7 (the one in the bundled zstandard 0.25.0 wheel) to reproduce the
original bytes. `strip` (binutils) shrinks the bundled zstandard extension; without it the
unstripped one is bundled. Takes about 7 minutes on 2 cores (mostly xz -9e of the 477 MB of cubins).

Output (in --out): skel.so.xz, sm90_cubins.xz, index.json, pkg.tar.xz, restore.py, install.sh,
check.py. It stops with an error if the fatbin layout is not the one this tool understands or if
the output exceeds the budget (--budget-mb, default 48 MB = 48e6 bytes).
"""
import argparse
import collections
import ctypes
import ctypes.util
import hashlib
import io
import json
import lzma
import os
import shutil
import struct
import subprocess
import sys
import tarfile
import tempfile
import threading
import time
import zipfile

HERE = os.path.dirname(os.path.abspath(__file__))
CUDA_SO = 'onnxruntime/capi/libonnxruntime_providers_cuda.so'
ZSTD_LEVEL = 19              # level NVIDIA's fatbinary used; recorded for restore.py
KEEP_ARCH = 90               # sm_90 (H100/H200)
FATBIN_MAGIC = 0xBA55ED50    # container header magic (little endian bytes 50 ed 55 ba)
ENTRY_HEADER_SIZE = 64       # restore.py relies on this (header = payload offset - 64)
KIND_PTX, KIND_ELF = 1, 2
FLAG_COMPRESSED = 0x8000     # entry payload is one zstd frame
ZSTD_MAGIC = 0xFD2FB528
TOOLS_FILES = ('zstandard/__init__.py', 'zstandard/backend_c.cpython-312-x86_64-linux-gnu.so')
TOOLS_LICENSE = 'zstandard-0.25.0.dist-info/licenses/LICENSE'
SCRIPTS = ('restore.py', 'install.sh', 'check.py')


class LayoutError(SystemExit):
    def __init__(self, msg):
        super().__init__(f'make_carry: unexpected layout: {msg}')


def log(*a):
    print('[make_carry]', *a, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- zstd (decompression only)
def zstd_frame_info(buf, pos, end):
    """Pure-Python walk of one zstd frame at buf[pos:end]: (compressed size, content size or None)."""
    if pos + 6 > end or struct.unpack_from('<I', buf, pos)[0] != ZSTD_MAGIC:
        raise LayoutError(f'no zstd frame at {pos:#x}')
    fhd = buf[pos + 4]
    fcs_flag, single, checksum, did_flag = fhd >> 6, (fhd >> 5) & 1, (fhd >> 2) & 1, fhd & 3
    p = pos + 5 + (0 if single else 1) + (0, 1, 2, 4)[did_flag]
    fcs_len = (1 if single else 0, 2, 4, 8)[fcs_flag]
    content = None
    if fcs_len:
        content = int.from_bytes(buf[p:p + fcs_len], 'little') + (256 if fcs_len == 2 else 0)
    p += fcs_len
    while True:
        if p + 3 > end:
            raise LayoutError(f'zstd frame at {pos:#x} runs past its slot')
        bh = int.from_bytes(buf[p:p + 3], 'little')
        last, btype, bsize = bh & 1, (bh >> 1) & 3, bh >> 3
        if btype == 3:
            raise LayoutError(f'reserved zstd block type in frame at {pos:#x}')
        p += 3 + (1 if btype == 1 else bsize)
        if last:
            break
    p += 4 if checksum else 0
    if p > end:
        raise LayoutError(f'zstd frame at {pos:#x} runs past its slot')
    return p - pos, content


def make_decompressor():
    """Return (name, fn(frame_bytes, size) -> bytes) for the first zstd decoder found."""
    path = ctypes.util.find_library('zstd') or 'libzstd.so.1'
    try:
        lib = ctypes.CDLL(path)
        lib.ZSTD_decompress.restype = ctypes.c_size_t
        lib.ZSTD_decompress.argtypes = [ctypes.c_char_p, ctypes.c_size_t, ctypes.c_char_p, ctypes.c_size_t]
        lib.ZSTD_isError.argtypes = [ctypes.c_size_t]
        lib.ZSTD_versionString.restype = ctypes.c_char_p

        def dec(frame, size):
            out = ctypes.create_string_buffer(size)
            r = lib.ZSTD_decompress(out, size, frame, len(frame))
            if lib.ZSTD_isError(r) or r != size:
                raise SystemExit(f'make_carry: zstd decompression failed ({r} of {size} bytes)')
            return out.raw
        return f'libzstd {lib.ZSTD_versionString().decode()} (ctypes, {path})', dec
    except (OSError, AttributeError):
        pass
    try:
        from compression import zstd as stdzstd  # Python 3.14+

        def dec(frame, size):
            return stdzstd.decompress(frame)
        return 'compression.zstd (stdlib)', dec
    except ImportError:
        pass
    exe = shutil.which('zstd')
    if exe:
        def dec(frame, size):
            return subprocess.run([exe, '-d', '-c', '-q'], input=frame, stdout=subprocess.PIPE,
                                  check=True).stdout
        return f'zstd CLI ({exe})', dec
    raise SystemExit('make_carry: no zstd decompressor: install libzstd1 or the zstd CLI, or use Python 3.14+')


# ---------------------------------------------------------------- fatbin parsing
def find_section(elf, name):
    if elf[:4] != b'\x7fELF' or elf[4] != 2 or elf[5] != 1:
        raise LayoutError('not a little-endian ELF64 file')
    shoff, = struct.unpack_from('<Q', elf, 0x28)
    shentsize, shnum, shstrndx = struct.unpack_from('<HHH', elf, 0x3a)

    def header(i):  # name, type, flags, addr, offset, size, ...
        return struct.unpack_from('<IIQQQQIIQQ', elf, shoff + i * shentsize)
    strtab = header(shstrndx)[4]
    for i in range(shnum):
        h = header(i)
        nm = bytes(elf[strtab + h[0]:elf.index(b'\0', strtab + h[0])]).decode()
        if nm == name:
            return h[4], h[5]
    raise LayoutError(f'no {name} section')


def parse_fatbin(elf):
    """List of containers, each a list of entry dicts, from the .nv_fatbin section."""
    off, size = find_section(elf, '.nv_fatbin')
    end = off + size
    log(f'.nv_fatbin offset={off:#x} size={size}')
    containers = []
    p = off
    magic = struct.pack('<I', FATBIN_MAGIC)
    while p < end:
        if elf[p:p + 4] != magic:
            q = elf.find(magic, p, end)
            stop = q if q >= 0 else end
            if any(elf[p:stop]):
                raise LayoutError(f'non-zero bytes between fatbin containers at {p:#x}')
            if q < 0:
                break
            p = q
            continue
        _, _, header_size, body_size = struct.unpack_from('<IHHQ', elf, p)
        e, cend = p + header_size, p + header_size + body_size
        if cend > end:
            raise LayoutError(f'container at {p:#x} runs past the section')
        entries = []
        while e < cend:
            kind, _, ehs, esize = struct.unpack_from('<HHIQ', elf, e)
            csize, = struct.unpack_from('<I', elf, e + 16)
            arch, = struct.unpack_from('<I', elf, e + 28)
            flags, = struct.unpack_from('<Q', elf, e + 40)
            dsize, = struct.unpack_from('<Q', elf, e + 56)
            if ehs < ENTRY_HEADER_SIZE:
                raise LayoutError(f'entry header of {ehs} bytes at {e:#x}')
            entries.append(dict(hdr=e, kind=kind, hs=ehs, size=esize, csz=csize, arch=arch, flags=flags, dsz=dsize))
            e += ehs + esize
        if e != cend:
            raise LayoutError(f'entries of container at {p:#x} end at {e:#x}, not {cend:#x}')
        containers.append(entries)
        p = cend
    if not containers:
        raise LayoutError('no fatbin containers')
    return containers


def keep_entry(x, has_sm90):
    """sm_90 cubins stay; PTX stays only where a container has no sm_90 cubin (and arch <= 90)."""
    if x['kind'] == KIND_ELF:
        return x['arch'] == KEEP_ARCH
    if x['kind'] == KIND_PTX:
        return x['arch'] == KEEP_ARCH if has_sm90 else x['arch'] <= KEEP_ARCH
    return True


def split_library(so_bytes, decompress):
    """Return (index dict, skeleton bytes, sm_90 cubin stream as list of bytes)."""
    elf = bytearray(so_bytes)
    n = len(elf)
    containers = parse_fatbin(elf)
    count, nbytes = collections.Counter(), collections.Counter()
    for c in containers:
        for x in c:
            count[x['kind'], x['arch']] += 1
            nbytes[x['kind'], x['arch']] += x['size']
    log(f'{len(containers)} containers')
    for k in sorted(count):
        log(f'  {"PTX" if k[0] == KIND_PTX else "ELF" if k[0] == KIND_ELF else k[0]} arch={k[1]}: '
            f'{count[k]} entries, {nbytes[k]} bytes')
    without = sum(1 for c in containers if not any(x['kind'] == KIND_ELF and x['arch'] == KEEP_ARCH for x in c))
    log(f'containers without an sm_{KEEP_ARCH} cubin: {without}')

    # 1) zero every entry payload that is not kept -> the "modified" library restore.py rebuilds
    kept, zeroed = [], 0
    for c in containers:
        has_sm90 = any(x['kind'] == KIND_ELF and x['arch'] == KEEP_ARCH for x in c)
        for x in c:
            a = x['hdr'] + x['hs']
            if keep_entry(x, has_sm90):
                kept.append(x)
            else:
                elf[a:a + x['size']] = bytes(x['size'])
                zeroed += x['size']
    log(f'zeroed {zeroed} payload bytes, kept {len(kept)} entries')
    modified_sha = hashlib.sha256(elf).hexdigest()
    log('modified library sha256', modified_sha)

    # 2) move kept (zstd-compressed sm_90 cubin) payloads out, decompressed
    entries, cubins, total = [], [], 0
    for x in kept:
        a = x['hdr'] + x['hs']
        if x['kind'] != KIND_ELF or not x['flags'] & FLAG_COMPRESSED:
            raise LayoutError(f'kept entry at {x["hdr"]:#x} is not a compressed cubin: {x}')
        if x['hs'] != ENTRY_HEADER_SIZE:
            raise LayoutError(f'entry header size {x["hs"]} != {ENTRY_HEADER_SIZE} at {x["hdr"]:#x}')
        if x['csz'] > x['size']:
            raise LayoutError(f'compressed size {x["csz"]} > slot {x["size"]} at {x["hdr"]:#x}')
        fsize, content = zstd_frame_info(elf, a, a + x['size'])
        if fsize != x['csz'] or content not in (None, x['dsz']):
            raise LayoutError(f'zstd frame at {a:#x}: size {fsize}/{content}, header says {x["csz"]}/{x["dsz"]}')
        if any(elf[a + x['csz']:a + x['size']]):
            raise LayoutError(f'non-zero padding after zstd frame at {a:#x}')
        data = decompress(bytes(elf[a:a + x['csz']]), x['dsz'])
        if len(data) != x['dsz']:
            raise SystemExit(f'make_carry: decompressed {len(data)} bytes, expected {x["dsz"]} at {a:#x}')
        cubins.append(data)
        total += len(data)
        entries.append([a, x['csz'], x['size'], x['dsz']])
        elf[a:a + x['size']] = bytes(x['size'])
    if len(elf) != n:
        raise LayoutError('library size changed')
    log(f'sm_{KEEP_ARCH} cubins: {len(entries)} entries, {total} bytes decompressed')
    index = dict(file=CUDA_SO, size=n, sha256=modified_sha, zstd_level=ZSTD_LEVEL, entries=entries)
    return index, bytes(elf), cubins


# ---------------------------------------------------------------- outputs
def xz_9e(chunks, path, dict_size=None):
    """xz -9e (one block, CRC64) of the concatenated chunks, as the original carry was made."""
    filt = dict(id=lzma.FILTER_LZMA2, preset=9 | lzma.PRESET_EXTREME)
    if dict_size:
        filt['dict_size'] = dict_size
    comp = lzma.LZMACompressor(format=lzma.FORMAT_XZ, check=lzma.CHECK_CRC64, filters=[filt])
    with open(path, 'wb') as f:
        for c in chunks:
            f.write(comp.compress(c))
        f.write(comp.flush())


def build_pkg_tar(wheel, zs_wheel, path):
    """pkg.tar.xz: ortsite/ = the wheel minus the CUDA provider; ortsite_tools/zstandard (stripped)."""
    buf = io.BytesIO()
    members = []  # (name, bytes or None for a directory, mode)
    with zipfile.ZipFile(wheel) as z:
        for info in sorted(z.infolist(), key=lambda i: i.filename):
            if info.is_dir() or info.filename == CUDA_SO:
                continue
            members.append(('ortsite/' + info.filename, z.read(info), 0o644))
    with zipfile.ZipFile(zs_wheel) as z:
        names = set(z.namelist())
        for f in TOOLS_FILES + (TOOLS_LICENSE,):
            if f not in names:
                raise SystemExit(f'make_carry: {f} not in {zs_wheel} (need zstandard 0.25.0 cp312)')
        for f in TOOLS_FILES:
            data, mode = z.read(f), 0o644
            if f.endswith('.so'):
                data, mode = strip_so(data), 0o755
            members.append(('ortsite_tools/' + f, data, mode))
        members.append(('ortsite_tools/zstandard/LICENSE', z.read(TOOLS_LICENSE), 0o644))
    dirs = set()
    for n, _, _ in members:
        parts = n.split('/')[:-1]
        dirs.update('/'.join(parts[:i]) for i in range(1, len(parts) + 1))
    dirs = sorted(dirs)
    mtime = int(time.time())
    with tarfile.open(fileobj=buf, mode='w', format=tarfile.GNU_FORMAT) as tar:
        for d in dirs:
            ti = tarfile.TarInfo(d)
            ti.type, ti.mode, ti.mtime, ti.uname, ti.gname = tarfile.DIRTYPE, 0o755, mtime, 'root', 'root'
            tar.addfile(ti)
        for name, data, mode in sorted(members):
            ti = tarfile.TarInfo(name)
            ti.size, ti.mode, ti.mtime, ti.uname, ti.gname = len(data), mode, mtime, 'root', 'root'
            tar.addfile(ti, io.BytesIO(data))
    xz_9e([buf.getvalue()], path)


def strip_so(data):
    exe = shutil.which('strip')
    if not exe:
        log('WARNING: no `strip` (binutils); bundling the unstripped zstandard extension (~11 MB)')
        return data
    with tempfile.TemporaryDirectory() as d:
        src, dst = os.path.join(d, 'in.so'), os.path.join(d, 'out.so')
        open(src, 'wb').write(data)
        subprocess.run([exe, '--strip-all', '-o', dst, src], check=True)
        return open(dst, 'rb').read()


def main():
    ap = argparse.ArgumentParser(description=__doc__.split('\n')[0])
    ap.add_argument('--wheel', required=True, help='onnxruntime_gpu-1.31.1-cp312-...whl')
    ap.add_argument('--zstandard-wheel', required=True, help='zstandard-0.25.0-cp312-...whl')
    ap.add_argument('--out', required=True, help='carry directory to (re)create, e.g. .ortgpu')
    ap.add_argument('--budget-mb', type=float, default=48.0, help='limit on the total size, 1e6 bytes (48)')
    args = ap.parse_args()
    t0 = time.time()
    name, decompress = make_decompressor()
    log('zstd decompressor:', name)

    with zipfile.ZipFile(args.wheel) as z:
        if CUDA_SO not in z.namelist():
            raise SystemExit(f'make_carry: {CUDA_SO} not in {args.wheel}')
        so_bytes = z.read(CUDA_SO)
    log(f'{CUDA_SO}: {len(so_bytes)} bytes')
    index, skeleton, cubins = split_library(so_bytes, decompress)
    del so_bytes
    log(f'parsed in {time.time() - t0:.0f} s')

    out = os.path.abspath(args.out)
    tmp = out + '.tmp'
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    with open(os.path.join(tmp, 'index.json'), 'w') as f:
        json.dump(index, f)
    for s in SCRIPTS:
        shutil.copy2(os.path.join(HERE, s), os.path.join(tmp, s))

    # the three xz streams in threads (liblzma releases the GIL); the cubins take longest
    errors = []

    def run(fn, *a):
        try:
            fn(*a)
        except BaseException as e:  # noqa: BLE001 - reported below
            errors.append(e)
    def skeleton_then_pkg():
        run(xz_9e, [skeleton], os.path.join(tmp, 'skel.so.xz'))
        run(build_pkg_tar, args.wheel, args.zstandard_wheel, os.path.join(tmp, 'pkg.tar.xz'))
    jobs = [threading.Thread(target=run, args=(xz_9e, cubins, os.path.join(tmp, 'sm90_cubins.xz'), 512 << 20)),
            threading.Thread(target=skeleton_then_pkg)]
    for j in jobs:
        j.start()
    for j in jobs:
        j.join()
    if errors:
        raise errors[0]

    sizes = {f: os.path.getsize(os.path.join(tmp, f)) for f in sorted(os.listdir(tmp))}
    total = sum(sizes.values())
    for f, s in sizes.items():
        log(f'  {f:16s} {s:>10d}')
    log(f'  total {total} bytes ({total / 1e6:.1f} MB, budget {args.budget_mb} MB)')
    if total > args.budget_mb * 1e6:
        raise SystemExit(f'make_carry: output is {total / 1e6:.1f} MB > budget {args.budget_mb} MB; '
                         f'left in {tmp}')
    shutil.rmtree(out, ignore_errors=True)
    os.replace(tmp, out)
    log(f'wrote {out} in {time.time() - t0:.0f} s')


if __name__ == '__main__':
    main()
