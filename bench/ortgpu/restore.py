"""Rebuild libonnxruntime_providers_cuda.so (sm_90-only fatbin) from skel.so.xz + sm90_cubins.xz.

usage: python3 restore.py CARRY_DIR DEST_SITE
Needs Python 3.12 and the zstandard package that pkg.tar.xz unpacks next to DEST_SITE
(DEST_SITE/../ortsite_tools, i.e. /tmp/ortsite_tools). Each sm_90 cubin is recompressed at the
recorded zstd level into its slot; with zstd 1.5.7 the bytes, and so the sha256, match the original.
"""
import hashlib
import json
import lzma
import multiprocessing as mp
import os
import struct
import sys

carry, dest = sys.argv[1], sys.argv[2]
sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(dest)), 'ortsite_tools'))
import zstandard  # noqa: E402

ENTRY_HEADER_SIZE = 64  # fatbin entry header; +8: slot size (u64), +16: compressed size (u32)
index = json.load(open(os.path.join(carry, 'index.json')))
LEVEL = index['zstd_level']


def log(*a):
    print('[restore]', *a, file=sys.stderr, flush=True)


log('zstd', zstandard.ZSTD_VERSION, 'level', LEVEL, '(bit-exact needs 1.5.7)')
library = bytearray(lzma.open(os.path.join(carry, 'skel.so.xz')).read())
assert len(library) == index['size'], 'skeleton size mismatch'
cubins = lzma.open(os.path.join(carry, 'sm90_cubins.xz')).read()
entries = index['entries']  # [payload offset, compressed size, slot size, decompressed size]
starts, total = [], 0
for _, _, _, dsize in entries:
    starts.append(total)
    total += dsize
assert total == len(cubins), ('cubin stream size', total, len(cubins))


def compress(i):
    dsize = entries[i][3]
    return i, zstandard.ZstdCompressor(level=LEVEL, write_content_size=True).compress(
        cubins[starts[i]:starts[i] + dsize])


with mp.get_context('fork').Pool(os.cpu_count() or 1) as pool:
    exact = refit = 0
    for i, frame in pool.imap_unordered(compress, range(len(entries)), chunksize=4):
        offset, csize, slot, dsize = entries[i]
        header = offset - ENTRY_HEADER_SIZE
        assert (struct.unpack_from('<Q', library, header + 8)[0] == slot
                and struct.unpack_from('<I', library, header + 16)[0] == csize)
        if len(frame) == csize:
            exact += 1
        elif len(frame) <= slot:  # another zstd version: still fits the slot; fix the compressed-size field
            struct.pack_into('<I', library, header + 16, len(frame))
            refit += 1
        else:
            raise SystemExit(f'entry {i}: recompressed {len(frame)} > slot {slot}; need zstd 1.5.7')
        library[offset:offset + len(frame)] = frame
log(f'entries: {exact} exact, {refit} refit, of {len(entries)}')
sha = hashlib.sha256(library).hexdigest()
log('sha256', sha, 'MATCH' if sha == index['sha256'] else 'DIFFERS (ok only if refit>0)')
out = os.path.join(dest, index['file'])
with open(out + '.tmp', 'wb') as f:
    f.write(library)
os.chmod(out + '.tmp', 0o755)
os.replace(out + '.tmp', out)
log('wrote', out, len(library))
