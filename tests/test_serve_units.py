"""The service's parts in-process: image decoding and its refusals, the SQLite store (keys, journal hash
chain, torn WAL tail), quotas and rate limits, and start-up: exact restore (snapshot + journal replay)
and clear refusals for an unwritable or full workdir and damaged snapshots, journals and counters."""
import asyncio
import base64
import io
import os
import shutil
import sqlite3
import struct
import subprocess
import sys
import threading
import warnings
import zlib

import numpy as np
import pytest
from PIL import Image

from b4b_jax.serve import accounts, defended, errors, images, service as service_lib, store as store_lib, testing

pytestmark = pytest.mark.usefixtures("fast_compiles")
LIMITS = images.Limits(max_request_bytes=2**20, max_rows_per_request=8, max_image_pixels=512 * 512,
                       max_image_bytes=2**19)
GEOMETRY = images.Geometry({"input_size": 16, "resize": None, "interpolation": "bilinear"})


def _png(array, **kw):
  buf = io.BytesIO()
  Image.fromarray(array, **kw).save(buf, format="PNG")
  return buf.getvalue()


def _refused(fn, status, code):
  with pytest.raises(errors.RequestError) as e:
    fn()
  assert (e.value.status, e.value.code) == (status, code), e.value.message
  return e.value.message


# ----------------------------------------------------------------------------------------- images
def test_images_decode_convert_modes_and_follow_the_manifest_geometry():
  rgb = testing.random_images(1, 40, seed=1)[0][:, :30]  # 40x30 -> shorter side 16, centre crop
  out = images.decode_image(_png(rgb), GEOMETRY, LIMITS, 0)
  ref = Image.fromarray(rgb).resize((16, 21), Image.Resampling.BILINEAR)
  ref = np.asarray(ref)[2:18]  # rows: round((21 - 16) / 2) = 2
  np.testing.assert_array_equal(out, ref)
  gray = rgb[..., 0]
  for data in (_png(gray), _png(np.dstack([rgb, rgb[..., :1]])),
               _png(np.asarray(Image.fromarray(rgb).convert("P")))):
    assert images.decode_image(data, GEOMETRY, LIMITS, 0).shape == (16, 16, 3)
  buf = io.BytesIO()
  Image.fromarray(rgb).save(buf, format="JPEG")
  assert images.decode_image(buf.getvalue(), GEOMETRY, LIMITS, 0).dtype == np.uint8
  exact = testing.random_images(3, 16)
  np.testing.assert_array_equal(images.decode_npy(images.encode_npy(exact), GEOMETRY, LIMITS), exact)


def _header_claiming(width, height):
  """A valid small PNG whose IHDR claims width x height pixels (CRC fixed), its data truncated: a
  decompression bomb's header, refused before any pixel is inflated when it claims too many."""
  data = bytearray(_png(np.zeros((4, 4), np.uint8)))
  data[16:24] = struct.pack(">II", width, height)
  data[29:33] = struct.pack(">I", zlib.crc32(bytes(data[12:29])) & 0xFFFFFFFF)
  return bytes(data)


def test_images_refuse_bad_files_with_a_status_and_a_message_naming_the_problem():
  good = _png(testing.random_images(1, 16)[0])
  cases = [
      (b"", 422, "empty_image"), (b"GIF89a....", 422, "unsupported_image_format"),
      (good[:len(good) // 2], 422, "corrupt_image"),
      (good[:40] + bytes(100) + good[140:], 422, "corrupt_image"),
      (_header_claiming(60000, 60000), 413, "image_too_many_pixels"),
      (_png(np.zeros((1024, 1024), np.uint8)), 413, "image_too_many_pixels"),  # a real 1 Mpx bomb
      (_png(np.zeros((16, 16), np.uint16)), 422, "unsupported_bit_depth"),  # PIL writes 16-bit
  ]
  buf = io.BytesIO()
  Image.new("CMYK", (16, 16)).save(buf, format="JPEG")
  cases.append((buf.getvalue(), 422, "unsupported_color_mode"))
  for data, status, code in cases:
    message = _refused(lambda d=data: images.decode_image(d, GEOMETRY, LIMITS, 3), status, code)
    assert "image 3" in message
  npy = lambda a: images.encode_npy(a)  # noqa: E731
  u8 = testing.random_images(2, 16)
  for body, status, code in [
      (b"", 400, "empty_body"), (b"\x93NUMPY garbage", 400, "malformed_npy"),
      (npy(u8.astype(np.float32)), 422, "wrong_dtype"), (npy(u8[..., :1]), 422, "wrong_channels"),
      (npy(np.concatenate([u8, u8[..., :1]], -1)), 422, "wrong_channels"),
      (npy(u8[:, :8]), 422, "wrong_image_size"), (npy(u8[0, 0]), 422, "wrong_shape"),
      (npy(testing.random_images(9, 16)), 413, "too_many_images"),
      (npy(u8[:0]), 422, "no_images"), (npy(u8)[:-5], 400, "truncated_npy")]:
    _refused(lambda b=body: images.decode_npy(b, GEOMETRY, LIMITS), status, code)


def _in_threads_switching_often(fn, num_threads=8):
  """Runs fn in num_threads threads at once, CPython switching between them as often as it allows (so
  that a race, if there is one, is likely to show); returns when all are done."""
  interval = sys.getswitchinterval()
  sys.setswitchinterval(1e-6)
  try:
    threads = [threading.Thread(target=fn) for _ in range(num_threads)]
    for t in threads:
      t.start()
    for t in threads:
      t.join()
  finally:
    sys.setswitchinterval(interval)


def test_npy_bodies_decode_correctly_from_many_threads_at_once():
  # The server decodes bodies in a thread pool. numpy's npy header parse runs `ast.literal_eval`, whose
  # AST conversion is not thread-safe on CPython 3.11 (gh-106905): unserialised, a tiny switch interval
  # makes ~0.4 % of these parses fail with "AST constructor recursion depth mismatch" (refused as
  # malformed_npy; CI met it once under load).
  u8 = testing.random_images(2, 16)
  body, failures, wrong = images.encode_npy(u8), [], []

  def decode_many():
    for _ in range(1500):
      try:
        out = images.decode_npy(body, GEOMETRY, LIMITS)
      except Exception as e:  # noqa: BLE001 (collected, asserted below)
        failures.append(repr(e))
        continue
      if not np.array_equal(out, u8):
        wrong.append(out.shape)

  _in_threads_switching_often(decode_many)
  assert not failures, (len(failures), failures[:3])
  assert not wrong


def test_bomb_guard_is_the_configured_limit_and_touches_no_process_wide_warning_state():
  # PIL's own check (Image.MAX_IMAGE_PIXELS, 89.5 M) warns between 1x and 2x its limit. The guard is
  # limits.max_image_pixels alone: a 100 M-pixel header is refused by it (413) without a warning
  # issued or recorded, and a provider whose limit is above PIL's gets its own limit, not PIL's.
  assert Image.MAX_IMAGE_PIXELS < 100_000_000 <= 2 * Image.MAX_IMAGE_PIXELS
  header = _header_claiming(10_000, 10_000)
  filters = list(warnings.filters)
  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    _refused(lambda: images.decode_image(header, GEOMETRY, LIMITS, 0), 413, "image_too_many_pixels")
    roomy = images.Limits(max_request_bytes=2**20, max_rows_per_request=8,
                          max_image_pixels=200_000_000, max_image_bytes=2**19)
    # Within the provider's limit: decoding is attempted and the truncated data is what is refused.
    _refused(lambda: images.decode_image(header, GEOMETRY, roomy, 0), 422, "corrupt_image")
  assert not caught, [str(w.message) for w in caught]
  assert warnings.filters == filters


def test_images_decode_from_many_threads_without_changing_the_warning_filters():
  # warnings.catch_warnings() swaps the interpreter-wide filter list; request threads entering and
  # leaving it out of order leave a filter of one of them installed for the whole process. Decoding
  # must not depend on (or change) that list, whatever the interleaving.
  good, bomb = _png(testing.random_images(1, 16)[0]), _header_claiming(10_000, 10_000)
  expected, filters, failures = images.decode_image(good, GEOMETRY, LIMITS, 0), list(warnings.filters), []

  def decode_many():
    for _ in range(300):
      try:
        if not np.array_equal(images.decode_image(good, GEOMETRY, LIMITS, 0), expected):
          failures.append("different pixels")
        images.decode_image(bomb, GEOMETRY, LIMITS, 1)
        failures.append("bomb accepted")
      except errors.RequestError as e:
        if e.code != "image_too_many_pixels":
          failures.append(e.code)

  try:
    _in_threads_switching_often(decode_many)
  finally:
    changed = warnings.filters != filters
    warnings.filters[:] = filters  # leave the process as it was for the other tests, whatever happened
    warnings._filters_mutated()  # pylint: disable=protected-access  (what catch_warnings calls on exit)
  assert not failures, failures[:3]
  assert not changed, "decoding from threads changed the process's warning filters"


# ----------------------------------------------------------------------------------------- store
def test_keys_are_hashed_verified_in_constant_time_and_revocable(tmp_path):
  st = store_lib.Store(str(tmp_path / "db.sqlite"))
  key_id, key = st.create_key("alice", quota_rows=10)
  assert st.verify_key(key) == (key_id, "alice")
  raw = sqlite3.connect(str(tmp_path / "db.sqlite")).execute("SELECT * FROM keys").fetchall()
  secret = key[len(f"{store_lib.KEY_PREFIX}{key_id}_"):]  # token_urlsafe may itself hold "_"
  assert len(secret) >= 32 and secret.encode() not in repr(raw).encode()  # only the salted hash is stored
  for bad in ("", "b4b_nope", key[:-1] + ("A" if key[-1] != "A" else "B"), key.replace(key_id, "0" * 12)):
    with pytest.raises(ValueError, match="invalid"):
      st.verify_key(bad)
  st.revoke_key(key_id)
  with pytest.raises(ValueError, match="revoked"):
    st.verify_key(key)
  with pytest.raises(ValueError):
    st.create_key("bad name!")


def test_journal_round_trip_hash_chain_and_truncation(tmp_path):
  st = store_lib.Store(str(tmp_path / "db.sqlite"))
  st.create_account("a")
  st.create_account("b")
  rng = np.random.default_rng(0)
  batches = []
  for _ in range(5):
    users = list(rng.choice(["a", "b"], 6))
    codes = rng.integers(0, 4096, (6, 20)).astype(np.int32)
    st.append_batch(users, codes, {"a": 1, "b": 1})
    batches.append((users, codes))
  got = list(st.read_journal(0))
  assert [e.seq for e in got] == [1, 2, 3, 4, 5]
  for e, (users, codes) in zip(got, batches):
    assert e.users_per_row == users
    np.testing.assert_array_equal(e.codes, codes)
  assert st.accounts()["a"]["rows"] + st.accounts()["b"]["rows"] == 30
  st.truncate_journal(3)
  assert [e.seq for e in st.read_journal(3)] == [4, 5]
  with pytest.raises(store_lib.StoreError, match="snapshot is older"):
    list(st.read_journal(2))
  with pytest.raises(store_lib.StoreError, match="journal ends at seq 5"):
    list(st.read_journal(7))
  db = sqlite3.connect(str(tmp_path / "db.sqlite"))
  db.execute("UPDATE journal SET codes=? WHERE seq=4", (bytes(240),))
  db.commit()
  with pytest.raises(store_lib.StoreError, match="entry 4 does not match its hash chain"):
    list(st.read_journal(3))
  db.execute("DELETE FROM journal WHERE seq=4")
  db.commit()
  with pytest.raises(store_lib.StoreError, match="entry 5 follows entry 3: entries are missing"):
    list(store_lib.Store(str(tmp_path / "db.sqlite")).read_journal(3))


def test_a_torn_last_journal_transaction_is_dropped_and_earlier_ones_kept(tmp_path):
  """A crash while SQLite appends entry 4 to the WAL (so its commit never returned and no answer of
  that batch left) leaves a torn tail: recovery keeps entries 1-3 and drops the torn one."""
  live = tmp_path / "live"
  live.mkdir()
  st = store_lib.Store(str(live / "db.sqlite"))
  st.create_account("a")
  for i in range(3):
    st.append_batch(["a"] * 4, np.full((4, 20), i, np.int32), {"a": 1})
  wal = str(live / "db.sqlite-wal")
  size3 = os.path.getsize(wal)
  st.append_batch(["a"] * 4, np.full((4, 20), 3, np.int32), {"a": 1})
  size4 = os.path.getsize(wal)
  assert size4 > size3
  for cut in (size3 + 1, (size3 + size4) // 2, size4 - 1):
    crash = tmp_path / f"crash{cut}"
    crash.mkdir()
    shutil.copy(str(live / "db.sqlite"), str(crash / "db.sqlite"))  # as on disk at the crash
    with open(wal, "rb") as f:
      (crash / "db.sqlite-wal").write_bytes(f.read()[:cut])
    revived = store_lib.Store(str(crash / "db.sqlite"))
    assert [e.seq for e in revived.read_journal(0)] == [1, 2, 3]
    assert revived.accounts()["a"]["rows"] == 12
    assert revived.append_batch(["a"], np.zeros((1, 20), np.int32), {"a": 1}) == 4


def test_quota_and_rate_limits_answer_429_and_reserve_rows_in_flight(tmp_path):
  st = store_lib.Store(str(tmp_path / "db.sqlite"))
  _, key = st.create_key("q", quota_rows=10)
  _, key2 = st.create_key("r", rate_rows_per_s=4)
  gate = accounts.Gatekeeper(st, max_rows_per_request=4)
  assert gate.authenticate(key) == "q"
  gate.admit("q", 6)
  _refused(lambda: gate.admit("q", 6), 429, "quota_exceeded")  # 6 in flight count
  gate.settle("q", 6, answered=False)
  gate.admit("q", 6)
  gate.settle("q", 6, answered=True)
  _refused(lambda: gate.admit("q", 5), 429, "quota_exceeded")
  assert gate.authenticate(key2) == "r"
  gate.admit("r", 4)
  gate.admit("r", 4)  # burst 2 s
  with pytest.raises(errors.RequestError) as e:
    gate.admit("r", 4)
  assert e.value.status == 429 and int(e.value.headers["Retry-After"]) >= 1
  _refused(lambda: gate.authenticate(""), 401, "missing_key")
  _refused(lambda: gate.authenticate("b4b_x"), 401, "invalid_key")


# ----------------------------------------------------------------------------------------- start-up
@pytest.fixture(scope="module")
def encoder_dir(tmp_path_factory):
  return testing.tiny_encoder_dir(str(tmp_path_factory.mktemp("enc") / "encoder"))


def _config(**persistence):
  from configs import serve as serve_config  # pylint: disable=g-import-not-at-top
  c = serve_config.get_config("tiny")
  c.batching.warm_up = False
  c.capacity = 8
  c.defense.num_hyperplanes = 8
  for k, v in persistence.items():
    c.persistence[k] = v
  return c


def _serve_some(workdir, encoder_dir, rounds=3, stop=True, snapshot_after=None):
  svc = service_lib.Service(_config(), str(workdir), encoder_dir)
  svc.start()
  keys = {u: svc.store.create_key(u)[1] for u in ("alice", "bob")}
  svc.gate.reload()

  async def go():
    for r in range(rounds):
      await asyncio.gather(*[svc.embed(u, testing.random_images(3 + r, seed=10 * r + i))
                             for i, u in enumerate(keys)])
      if snapshot_after == r:
        await asyncio.to_thread(svc.snapshot_now)

  asyncio.run(go())
  users, arrays = svc.state_arrays()
  if stop:
    svc.stop()
  return svc, users, arrays


def _open(workdir, encoder_dir, **persistence):
  svc = service_lib.Service(_config(**persistence), str(workdir), encoder_dir)
  try:
    svc.open()
    return svc
  except BaseException:
    svc.close()
    raise


def _same_state(svc, users, arrays):
  got_users, got = svc.state_arrays()
  assert got_users == users
  for k in arrays:
    np.testing.assert_array_equal(got[k], arrays[k], err_msg=k)


def test_restart_restores_snapshot_plus_journal_bit_identically(tmp_path, encoder_dir):
  assert _config().defense.noise_keying == "per_input"  # the hardened default, seen codes journaled
  live, users, arrays = _serve_some(tmp_path / "w", encoder_dir, rounds=4, stop=False,
                                    snapshot_after=1)
  crash = tmp_path / "crash"  # the files as a SIGKILL leaves them: snapshot at seq 2, journal 3..
  shutil.copytree(str(tmp_path / "w"), str(crash), ignore=shutil.ignore_patterns("*.sqlite-shm"))
  live.stop()
  assert service_lib.snapshot_dirs(str(crash))[-1][0] == 2
  revived = _open(crash, encoder_dir)
  _same_state(revived, users, arrays)
  assert revived.store.accounts()["alice"]["rows"] == 3 + 4 + 5 + 6
  revived.close()
  after_stop = _open(tmp_path / "w", encoder_dir)  # graceful stop: final snapshot, journal trimmed
  _same_state(after_stop, users, arrays)
  assert after_stop.store.journal_stats()["entries"] == 0
  after_stop.close()


def test_grouped_replay_equals_replaying_entry_by_entry(encoder_dir):
  """Start-up replays consecutive journal entries in one call while no account recurs: the state must
  equal one replay per entry (occupancy, counts, query and batch counters, registry order)."""
  from b4b_jax.defense import hardened  # pylint: disable=g-import-not-at-top
  config = _config().defense
  encoder = defended.load_encoder(encoder_dir)
  one_by_one = defended.open_api(encoder, config, capacity=8)
  settings = defended.inner(one_by_one).params.settings
  rng = np.random.default_rng(0)
  entries = []
  for seq in range(1, 41):
    names = list(rng.choice(["a", "b", "c", "d", "e", "f"], size=int(rng.integers(1, 3)), replace=False))
    users = [str(names[i]) for i in rng.integers(0, len(names), size=int(rng.integers(1, 9)))]
    codes = np.concatenate([  # the LSH buckets, then the hardened default's seen codes
        rng.integers(0, 1 << settings.num_hyperplanes, (len(users), settings.num_projections)),
        rng.integers(0, 1 << settings.fine_code_bits, (len(users), hardened.seen_columns(settings)))], 1)
    entries.append(store_lib.JournalEntry(seq, users, codes.astype(np.int32), {}))
  for e in entries:
    defended.replay(one_by_one, e.users_per_row, e.codes)
  grouped = defended.open_api(encoder, config, capacity=8)
  num_entries, calls = defended.replay_entries(grouped, iter(entries))
  assert num_entries == 40 and calls < 30, calls
  assert defended.inner(grouped).users == defended.inner(one_by_one).users
  want, got = defended.state_arrays(one_by_one), defended.state_arrays(grouped)
  for k in want:
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def test_damaged_snapshot_journal_or_counters_refuse_to_start(tmp_path, encoder_dir):
  _serve_some(tmp_path / "w", encoder_dir, rounds=2, stop=False, snapshot_after=0)[0].stop()
  base = tmp_path / "w"

  def damaged(name, edit):
    d = tmp_path / name
    shutil.copytree(str(base), str(d))
    edit(d)
    with pytest.raises(errors.StartupError) as e:
      _open(d, encoder_dir)
    return str(e.value)

  def flip_snapshot(d):
    snap = service_lib.snapshot_dirs(str(d))[-1][1]
    biggest = max((os.path.join(r, f) for r, _, fs in os.walk(snap) for f in fs), key=os.path.getsize)
    data = bytearray(open(biggest, "rb").read())
    data[len(data) // 2] ^= 0xFF
    open(biggest, "wb").write(bytes(data))

  assert "cannot be restored" in damaged("snap", flip_snapshot)

  def sql(statement, *args):
    def edit(d):
      db = sqlite3.connect(str(d / store_lib.DB_NAME))
      db.execute(statement, args)
      db.commit()
      db.close()
    return edit

  # After the graceful stop the journal is empty: add entries through a running service first.
  _serve_some(tmp_path / "j", encoder_dir, rounds=2, stop=False)[0].close()
  base = tmp_path / "j"
  assert "hash chain" in damaged("journal", sql("UPDATE journal SET codes=zeroblob(LENGTH(codes)) "
                                                 "WHERE seq=1"))
  assert "entries are missing" in damaged("gap", sql("DELETE FROM journal WHERE seq=1"))
  assert "the database counts" in damaged("counts", sql("UPDATE accounts SET rows=rows+1 WHERE "
                                                         "name='bob'"))
  msg = damaged("garbage", lambda d: (d / store_lib.DB_NAME).write_bytes(b"not a database" * 100))
  assert "damaged" in msg or "not a readable" in msg


def test_unwritable_or_full_workdir_is_a_clear_error_at_start(tmp_path, encoder_dir):
  with pytest.raises(errors.StartupError, match="MiB free"):
    _open(tmp_path / "w", encoder_dir, min_free_bytes=2**60)
  ro = tmp_path / "ro"
  ro.mkdir()
  mounted = []
  try:
    if os.geteuid() != 0:
      os.chmod(str(ro), 0o555)
    else:  # root ignores permissions: a read-only bind mount, where the platform allows it
      if subprocess.run(["mount", "--bind", str(ro), str(ro)], capture_output=True).returncode == 0:
        mounted.append(str(ro))
        subprocess.run(["mount", "-o", "remount,bind,ro", str(ro)], check=True, capture_output=True)
      else:
        pytest.skip("running as root without mount: cannot make a read-only directory")
    with pytest.raises(errors.StartupError, match="not writable"):
      _open(ro, encoder_dir)
    if mounted:  # a full disk: a 1 MiB tmpfs filled up
      full = tmp_path / "full"
      full.mkdir()
      subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m", "tmpfs", str(full)], check=True)
      mounted.append(str(full))
      with open(full / "filler", "wb") as f:
        try:
          while True:
            f.write(b"\0" * 65536)
            f.flush()
        except OSError:
          pass
      with pytest.raises(errors.StartupError, match="full disk"):
        _open(full, encoder_dir, min_free_bytes=0)
  finally:
    for m in reversed(mounted):
      subprocess.run(["umount", m], capture_output=True)
    os.chmod(str(ro), 0o755)


def test_config_resolution_encoder_dir_and_defense_json(tmp_path, encoder_dir):
  import json  # pylint: disable=g-import-not-at-top
  from b4b_jax.jobs import serve as serve_job  # pylint: disable=g-import-not-at-top
  c = _config()
  c.encoder_dir = encoder_dir
  config, resolved = serve_job.resolved_config(c, str(tmp_path))
  assert resolved == os.path.abspath(encoder_dir) and config.defense.transform == "diag_affine"
  assert config.defense.noise_keying == "per_input"  # hardened by default; the paper one field away
  (tmp_path / "d.json").write_text(json.dumps({"lam": 1e-4, "beta": 30.0, "hash_center": [0.5] * 8}))
  c.defense_json = str(tmp_path / "d.json")
  config, _ = serve_job.resolved_config(c, str(tmp_path))
  assert (config.defense.lam, config.defense.beta, config.defense.hash_center) == (1e-4, 30.0, [0.5] * 8)
  c.limits.max_rows_per_request = c.batching.max_rows + 1
  with pytest.raises(ValueError, match="max_rows_per_request"):
    serve_job.validate_config(c)
