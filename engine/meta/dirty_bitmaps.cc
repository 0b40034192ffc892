#include "meta/dirty_bitmaps.h"

#include <errno.h>

#include <algorithm>
#include <atomic>
#include <utility>

#include "absl/strings/escaping.h"
#include "absl/strings/str_cat.h"
#include "absl/strings/str_format.h"
#include "base/all_zero.h"
#include "base/endian.h"
#include "format/spec.h"
#include "qcow2fuse/status.h"

namespace qcow2fuse {
namespace {

// QEMU counts a disk in whole 512-byte sectors, and so do its bitmaps.
constexpr uint64_t kSectorSize = 512;
constexpr uint32_t kKnownFlags = spec::kBitmapFlagInUse | spec::kBitmapFlagAuto;
constexpr uint64_t kBitsPerWord = 64;

uint64_t CeilDiv(uint64_t a, uint64_t b) { return a / b + (a % b != 0); }

// Bits lo..hi (inclusive) of a word.
uint64_t WordMask(uint64_t lo, uint64_t hi) {
  return (hi == kBitsPerWord - 1 ? ~uint64_t{0} : (uint64_t{1} << (hi + 1)) - 1) & (~uint64_t{0} << lo);
}

// A reason a bitmap cannot be maintained, as opposed to an I/O error.
absl::Status Unmaintainable(std::string why) { return absl::FailedPreconditionError(std::move(why)); }
bool IsUnmaintainable(const absl::Status& status) {
  return absl::IsFailedPrecondition(status) || absl::IsResourceExhausted(status);
}

}  // namespace

struct DirtyBitmaps::Bitmap {
  BitmapDirectoryEntry entry;  // as on disk (offset, size and flags follow our writes)
  State state = State::kInconsistent;
  std::string why;       // kInconsistent
  bool loaded = false;   // the members below are valid
  bool marked = false;   // marked in use by this engine, not stored since
  uint64_t granules = 0;
  // Bit g of the bitmap (the disk's bytes [g, g + 1) * granularity) is bit
  // g % 64 of words[g / 64]: the spec's order once each word is stored
  // little-endian. Whole clusters of words, bits past `granules` zero.
  std::vector<uint64_t> words;
  std::vector<uint8_t> changed;     // per data cluster: bits set since the last Store
  std::vector<uint64_t> table;      // the entries for the current size, as Store writes them
  std::vector<uint64_t> disk_table; // the entries the directory reaches on disk
  uint64_t table_clusters = 0;      // clusters of the table on disk
  BudgetCharge charge;
};

DirtyBitmaps::DirtyBitmaps(const Context& context) : context_(context) {}
DirtyBitmaps::~DirtyBitmaps() = default;

std::string DirtyBitmaps::What(const Bitmap& b) const {
  return absl::StrFormat("persistent bitmap '%s' of %s", absl::CHexEscape(b.entry.name), context_.file->name());
}

Task<absl::StatusOr<std::unique_ptr<DirtyBitmaps>>> DirtyBitmaps::Load(const Context& context,
                                                                       const BitmapsExtension& ext,
                                                                       uint64_t disk_size) {
  std::unique_ptr<DirtyBitmaps> self(new DirtyBitmaps(context));
  self->directory_offset_ = ext.bitmap_directory_offset;
  self->disk_size_ = disk_size / kSectorSize * kSectorSize;
  // The header check bounded the directory to QEMU's 64 MiB limit.
  CO_RETURN_IF_ERROR(self->directory_charge_.Take(
      context.budget, ext.bitmap_directory_size, absl::StrFormat("the bitmap directory of %s", context.file->name())));
  self->directory_.resize(ext.bitmap_directory_size);
  CO_RETURN_IF_ERROR(co_await context.file->Read(ext.bitmap_directory_offset, self->directory_));
  absl::StatusOr<std::vector<BitmapDirectoryEntry>> entries = DecodeBitmapDirectory(self->directory_, ext.nb_bitmaps);
  if (!entries.ok()) co_return entries.status();
  for (BitmapDirectoryEntry& e : *entries) {
    auto b = std::make_unique<Bitmap>();
    b->entry = std::move(e);
    self->bitmaps_.push_back(std::move(b));
  }
  for (const std::unique_ptr<Bitmap>& bp : self->bitmaps_) {
    Bitmap& b = *bp;
    const uint32_t flags = b.entry.flags;
    if (b.entry.type != spec::kBitmapTypeDirtyTracking) {
      b.why = absl::StrFormat("its type %u is not a dirty tracking bitmap", b.entry.type);
    } else if (flags & ~kKnownFlags) {
      b.why = absl::StrFormat("it has flags %#x this engine does not know", flags & ~kKnownFlags);
    } else if (b.entry.extra_data_size != 0) {
      b.why = absl::StrFormat("it has %u bytes of extra data", b.entry.extra_data_size);
    } else if (flags & spec::kBitmapFlagInUse) {
      b.why = "it was in use already when the image was opened";
    } else if (b.entry.name.size() > spec::kMaxBitmapNameSize) {
      b.why = absl::StrFormat("its name of %u bytes is longer than QEMU allows", b.entry.name.size());
    }
    if (!b.why.empty()) continue;  // inconsistent
    if (!(flags & spec::kBitmapFlagAuto)) {
      b.state = State::kDisabled;
      continue;
    }
    absl::Status loaded = co_await self->LoadBits(b);
    if (loaded.ok()) {
      b.state = State::kRecorded;
      self->recording_.push_back(&b);
    } else if (IsUnmaintainable(loaded)) {
      b.why = std::string(loaded.message());
    } else {
      co_return Annotate(loaded, "loading the " + self->What(b));
    }
  }
  co_return self;
}

absl::StatusOr<DirtyBitmaps::Geometry> DirtyBitmaps::GeometryFor(const Bitmap& b, uint64_t disk_size) const {
  const uint32_t bits = b.entry.granularity_bits;
  if (bits < spec::kMinBitmapGranularityBits || bits > spec::kMaxBitmapGranularityBits) {
    return Unmaintainable(absl::StrFormat("its granularity of 2^%u bytes is outside QEMU's 2^%u to 2^%u", bits,
                                          spec::kMinBitmapGranularityBits, spec::kMaxBitmapGranularityBits));
  }
  const uint64_t cs = cluster_size();
  Geometry g;
  g.granules = CeilDiv(disk_size, uint64_t{1} << bits);
  const uint64_t bytes = CeilDiv(g.granules, 8);
  g.entries = CeilDiv(bytes, cs);
  if (g.entries == 0) return Unmaintainable("a disk of 0 bytes has no bitmap");
  if (g.entries > spec::kMaxBitmapTableEntries || g.entries * cs > spec::kMaxBitmapPhysBytes) {
    return Unmaintainable(absl::StrFormat(
        "a disk of %u bytes at its granularity of %u bytes needs %u clusters of bitmap data, more than QEMU's "
        "limit of %u bytes",
        disk_size, uint64_t{1} << bits, g.entries, spec::kMaxBitmapPhysBytes));
  }
  g.words = g.entries * (cs / 8);
  g.memory = g.words * 8 + g.entries * (sizeof(uint64_t) * 2 + 1);
  return g;
}

Task<absl::Status> DirtyBitmaps::LoadBits(Bitmap& b) {
  BlockFile& file = *context_.file;
  Refcounts& refcounts = *context_.refcounts;
  const uint64_t cs = cluster_size();
  absl::StatusOr<Geometry> g = GeometryFor(b, disk_size_);
  if (!g.ok()) co_return g.status();
  if (b.entry.bitmap_table_size != g->entries) {
    co_return Unmaintainable(absl::StrFormat("its table has %u entries, but a disk of %u bytes needs %u",
                                             b.entry.bitmap_table_size, disk_size_, g->entries));
  }
  const uint64_t table_offset = b.entry.bitmap_table_offset;
  const uint64_t table_bytes = g->entries * spec::kBitmapTableEntrySize;
  const uint64_t table_clusters = CeilDiv(table_bytes, cs);
  const uint64_t file_end = CeilDiv(file.size(), cs) * cs;
  if (table_offset == 0 || table_offset % cs != 0 || table_offset > file_end ||
      table_clusters * cs > file_end - table_offset) {
    co_return Unmaintainable(
        absl::StrFormat("its table at %#x is not cluster aligned or not inside the file", table_offset));
  }
  BudgetCharge charge;
  CO_RETURN_IF_ERROR(charge.Take(context_.budget, g->memory, What(b)));

  std::vector<uint64_t> table(g->entries);
  {
    std::vector<uint8_t> raw(table_bytes);
    CO_RETURN_IF_ERROR(co_await file.Read(table_offset, raw));
    for (uint64_t i = 0; i < g->entries; ++i) table[i] = LoadBE64(raw.data() + i * spec::kBitmapTableEntrySize);
  }
  // The table and the data are rewritten in place while the bitmap is in
  // use: each must be this bitmap's alone.
  for (uint64_t c = 0; c < table_clusters; ++c) {
    absl::StatusOr<uint64_t> count = co_await refcounts.Get((table_offset >> context_.cluster_bits) + c);
    if (!count.ok()) co_return count.status();
    if (*count != 1) {
      co_return Unmaintainable(absl::StrFormat("its table's cluster at %#x has refcount %u, not 1",
                                               table_offset + c * cs, *count));
    }
  }
  uint64_t data_clusters = 0;
  for (uint64_t i = 0; i < g->entries; ++i) {
    const uint64_t e = table[i];
    const uint64_t host = e & spec::kBitmapTableOffsetMask;
    std::string why;
    if (e & spec::kBitmapTableReservedMask) {
      why = "has reserved bits set";
    } else if (host != 0 && (e & spec::kBitmapTableAllOnes)) {
      why = "has the all-ones flag with an offset";
    } else if (host % cs != 0) {
      why = "points to an offset that is not cluster aligned";
    } else if (host != 0 && host >= file_end) {
      why = "points past the end of the file";
    }
    if (why.empty() && host != 0) {
      absl::StatusOr<uint64_t> count = co_await refcounts.Get(host >> context_.cluster_bits);
      if (!count.ok()) co_return count.status();
      if (*count != 1) why = absl::StrFormat("points to a cluster with refcount %u, not 1", *count);
      ++data_clusters;
    }
    if (!why.empty()) {
      co_return Unmaintainable(absl::StrFormat("its table entry %u (%#x) %s", i, e, why));
    }
  }
  CO_RETURN_IF_ERROR(charge.Take(context_.budget, data_clusters * MetadataMap::kBytesPerCluster, What(b)));
  // Registered, guest writes can never land on them (CheckHostWrite).
  std::vector<uint64_t> registered;
  auto unregister = [&] {
    for (uint64_t host : registered) context_.metadata->Remove(MetadataKind::kBitmapData, host);
  };
  for (uint64_t e : table) {
    const uint64_t host = e & spec::kBitmapTableOffsetMask;
    if (host == 0) continue;
    absl::Status added = context_.metadata->Add(MetadataKind::kBitmapData, host, cs);
    if (!added.ok()) {
      unregister();
      co_return Unmaintainable(absl::StrCat("its data: ", added.message()));
    }
    registered.push_back(host);
  }

  std::vector<uint64_t> words(g->words, 0);
  const uint64_t words_per_cluster = cs / 8;
  const uint64_t bits_per_cluster = cs * 8;
  std::vector<uint8_t> buffer(cs);
  for (uint64_t i = 0; i < g->entries; ++i) {
    const uint64_t host = table[i] & spec::kBitmapTableOffsetMask;
    if (host != 0) {
      absl::Status read = co_await file.Read(host, buffer);
      if (!read.ok()) {
        unregister();
        co_return read;
      }
      for (uint64_t w = 0; w < words_per_cluster; ++w) {
        words[i * words_per_cluster + w] = LoadLE64(buffer.data() + w * 8);
      }
    } else if (table[i] & spec::kBitmapTableAllOnes) {
      const uint64_t first = i * bits_per_cluster;
      const uint64_t last = std::min(first + bits_per_cluster, g->granules) - 1;
      for (uint64_t w = first / kBitsPerWord; w <= last / kBitsPerWord; ++w) {
        words[w] |= WordMask(w == first / kBitsPerWord ? first % kBitsPerWord : 0,
                             w == last / kBitsPerWord ? last % kBitsPerWord : kBitsPerWord - 1);
      }
    }
  }
  // The spec wants the bits past the disk's end zero; whatever is there
  // is no granule of the disk.
  if (g->granules % kBitsPerWord != 0) words[g->granules / kBitsPerWord] &= WordMask(0, g->granules % kBitsPerWord - 1);
  std::fill(words.begin() + CeilDiv(g->granules, kBitsPerWord), words.end(), 0);

  b.granules = g->granules;
  b.words = std::move(words);
  b.changed.assign(g->entries, 0);
  b.disk_table = table;
  b.table = std::move(table);
  b.table_clusters = table_clusters;
  b.charge = std::move(charge);
  b.loaded = true;
  co_return absl::OkStatus();
}

void DirtyBitmaps::Mark(uint64_t offset, uint64_t length) {
  if (length == 0) return;
  const uint64_t words_per_cluster = cluster_size() / 8;
  for (Bitmap* b : recording_) {
    const uint32_t bits = b->entry.granularity_bits;
    const uint64_t first = offset >> bits;
    if (first >= b->granules) continue;
    const uint64_t last = std::min((offset + length - 1) >> bits, b->granules - 1);
    for (uint64_t w = first / kBitsPerWord; w <= last / kBitsPerWord; ++w) {
      const uint64_t mask = WordMask(w == first / kBitsPerWord ? first % kBitsPerWord : 0,
                                     w == last / kBitsPerWord ? last % kBitsPerWord : kBitsPerWord - 1);
      std::atomic_ref<uint64_t> word(b->words[w]);
      // A granule written again costs a load, and no cache line changes hands.
      if ((word.load(std::memory_order_relaxed) & mask) == mask) continue;
      if ((word.fetch_or(mask, std::memory_order_relaxed) & mask) != mask) {
        std::atomic_ref<uint8_t>(b->changed[w / words_per_cluster]).store(1, std::memory_order_relaxed);
      }
    }
  }
}

void DirtyBitmaps::SetFlags(Bitmap& b, uint32_t flags) {
  b.entry.flags = flags;
  StoreBE32(directory_.data() + b.entry.position + spec::kBitmapDirOffFlags, flags);
}

Task<absl::Status> DirtyBitmaps::WriteDirectory() {
  // Only 8-byte aligned fields change, each inside one sector, so a torn
  // write leaves every field old or new.
  CO_RETURN_IF_ERROR(co_await context_.file->Write(directory_offset_, directory_));
  co_return co_await context_.file->Flush();
}

Task<absl::StatusOr<std::vector<DirtyBitmaps::Bitmap*>>> DirtyBitmaps::SetInUse(
    std::function<bool(const Bitmap&)> pick) {
  std::vector<std::pair<Bitmap*, uint32_t>> marking;  // and the flags before
  for (const std::unique_ptr<Bitmap>& b : bitmaps_) {
    if (!pick(*b) || (b->entry.flags & spec::kBitmapFlagInUse)) continue;
    marking.emplace_back(b.get(), b->entry.flags);
    SetFlags(*b, b->entry.flags | spec::kBitmapFlagInUse);
  }
  std::vector<Bitmap*> marked;
  if (marking.empty()) co_return marked;
  absl::Status written = co_await WriteDirectory();
  if (!written.ok()) {
    // Marked again by the next change.
    for (auto [b, flags] : marking) SetFlags(*b, flags);
    co_return Annotate(written, absl::StrFormat("marking the persistent bitmaps of %s in use", context_.file->name()));
  }
  for (auto [b, flags] : marking) marked.push_back(b);
  co_return marked;
}

Task<absl::Status> DirtyBitmaps::MarkInUse() {
  absl::StatusOr<std::vector<Bitmap*>> marked =
      co_await SetInUse([](const Bitmap& b) { return b.state != State::kDisabled; });
  if (!marked.ok()) co_return marked.status();
  for (Bitmap* b : *marked) b->marked = b->loaded;
  co_return absl::OkStatus();
}

Task<absl::Status> DirtyBitmaps::PrepareResize(uint64_t new_size) {
  const uint64_t size = new_size / kSectorSize * kSectorSize;
  if (size == disk_size_) co_return absl::OkStatus();
  auto refuse = [&](const Bitmap& b, std::string_view why) {
    return WithErrno(absl::FailedPreconditionError(absl::StrFormat(
                         "cannot resize %s to %u bytes: its persistent bitmap '%s' %s", context_.file->name(),
                         new_size, absl::CHexEscape(b.entry.name), why)),
                     EOPNOTSUPP);
  };
  for (const std::unique_ptr<Bitmap>& b : bitmaps_) {
    if (b->state == State::kInconsistent) {
      // As QEMU refuses it: the bitmap could not follow.
      co_return refuse(*b, absl::StrCat("is inconsistent (", b->why,
                                        "); remove it first (qemu-img bitmap --remove)"));
    }
  }
  // Disabled bitmaps change size with the disk too, as in QEMU: left as
  // they are, QEMU would find them too small, or fail to load them.
  for (const std::unique_ptr<Bitmap>& b : bitmaps_) {
    if (b->loaded) continue;
    absl::Status loaded = co_await LoadBits(*b);
    if (IsUnmaintainable(loaded)) co_return refuse(*b, absl::StrCat("(disabled) cannot follow: ", loaded.message()));
    CO_RETURN_IF_ERROR(loaded);
  }
  for (const std::unique_ptr<Bitmap>& b : bitmaps_) {
    absl::StatusOr<Geometry> g = GeometryFor(*b, size);
    if (!g.ok()) co_return refuse(*b, absl::StrCat("cannot follow: ", g.status().message()));
    const uint64_t now = b->words.size() * 8 + b->table.size() * (sizeof(uint64_t) * 2 + 1);
    if (g->memory > now) CO_RETURN_IF_ERROR(b->charge.Take(context_.budget, g->memory - now, What(*b)));
  }
  absl::StatusOr<std::vector<Bitmap*>> marked = co_await SetInUse([](const Bitmap&) { return true; });
  if (!marked.ok()) co_return marked.status();
  for (Bitmap* b : *marked) b->marked = true;
  co_return absl::OkStatus();
}

void DirtyBitmaps::Resize(uint64_t new_size) {
  const uint64_t size = new_size / kSectorSize * kSectorSize;
  if (size == disk_size_) return;
  for (const std::unique_ptr<Bitmap>& bp : bitmaps_) {
    Bitmap& b = *bp;
    if (!b.loaded) continue;  // PrepareResize found none
    const absl::StatusOr<Geometry> g = GeometryFor(b, size);
    if (!g.ok()) continue;  // PrepareResize refused it
    const uint64_t old_entries = b.table.size();
    b.words.resize(g->words, 0);
    if (g->granules < b.granules) {
      // Granules past the new end go, as in QEMU (a later grow brings them
      // back clean).
      if (g->granules % kBitsPerWord != 0) b.words[g->granules / kBitsPerWord] &= WordMask(0, g->granules % kBitsPerWord - 1);
      std::fill(b.words.begin() + CeilDiv(g->granules, kBitsPerWord), b.words.end(), 0);
    }
    b.changed.resize(g->entries, 0);
    b.table.resize(g->entries, 0);
    // The cluster where the old end was now covers other granules: an
    // all-ones entry there would claim the new granules too, and the bits
    // past a new end must be stored as zeros.
    b.changed[std::min(old_entries, g->entries) - 1] = 1;
    // Entries that come back before a Store keep the cluster they have on
    // disk, rewritten (with zeros) rather than left behind.
    for (uint64_t i = old_entries; i < std::min<uint64_t>(g->entries, b.disk_table.size()); ++i) {
      b.table[i] = b.disk_table[i];
      b.changed[i] = 1;
    }
    b.granules = g->granules;
  }
  disk_size_ = size;
}

void DirtyBitmaps::Serialize(const Bitmap& b, uint64_t index, std::span<uint8_t> out) const {
  const uint64_t words_per_cluster = cluster_size() / 8;
  for (uint64_t w = 0; w < words_per_cluster; ++w) {
    StoreLE64(out.data() + w * 8, b.words[index * words_per_cluster + w]);
  }
}

bool DirtyBitmaps::AllOnes(const Bitmap& b, uint64_t index) const {
  const uint64_t bits_per_cluster = cluster_size() * 8;
  const uint64_t first = index * bits_per_cluster;
  const uint64_t last = std::min(first + bits_per_cluster, b.granules) - 1;
  for (uint64_t w = first / kBitsPerWord; w <= last / kBitsPerWord; ++w) {
    const uint64_t mask = WordMask(w == first / kBitsPerWord ? first % kBitsPerWord : 0,
                                   w == last / kBitsPerWord ? last % kBitsPerWord : kBitsPerWord - 1);
    if ((b.words[w] & mask) != mask) return false;
  }
  return true;
}

Task<absl::Status> DirtyBitmaps::Store() {
  std::vector<Bitmap*> stored;
  for (const std::unique_ptr<Bitmap>& b : bitmaps_) {
    if (b->loaded && b->marked) stored.push_back(b.get());
  }
  if (stored.empty()) co_return absl::OkStatus();
  BlockFile& file = *context_.file;
  Refcounts& refcounts = *context_.refcounts;
  MetadataMap& metadata = *context_.metadata;
  const uint64_t cs = cluster_size();
  const std::string storing = absl::StrFormat("storing the persistent bitmaps of %s", file.name());

  // 1. Data clusters: in place, or new where the table has none.
  std::vector<uint8_t> buffer(cs);
  bool wrote = false;
  for (Bitmap* b : stored) {
    for (uint64_t i = 0; i < b->table.size(); ++i) {
      if (!b->changed[i] && i < b->disk_table.size()) continue;
      uint64_t& entry = b->table[i];
      uint64_t host = entry & spec::kBitmapTableOffsetMask;
      Serialize(*b, i, buffer);
      if (host == 0) {
        if (IsAllZero(std::span<const uint8_t>(buffer))) {
          entry = 0;
          continue;
        }
        if ((entry & spec::kBitmapTableAllOnes) && AllOnes(*b, i)) continue;
        absl::StatusOr<uint64_t> fresh = co_await refcounts.Allocate(1);
        if (!fresh.ok()) co_return Annotate(fresh.status(), storing);
        absl::Status added = metadata.Add(MetadataKind::kBitmapData, *fresh, cs);
        if (!added.ok()) {
          co_return absl::DataLossError(absl::StrFormat("%s: the new cluster for %s: %s", storing, What(*b), added.message()));
        }
        entry = *fresh;
        host = *fresh;
      }
      CO_RETURN_IF_ERROR(co_await file.Write(host, buffer));
      wrote = true;
    }
  }
  if (wrote) {
    CO_RETURN_IF_ERROR(co_await refcounts.WriteBack());
    CO_RETURN_IF_ERROR(co_await file.Flush());
  }

  // 2. Table entries: in place where the table's clusters hold them all,
  // else a new table.
  struct Moved {
    Bitmap* b;
    uint64_t offset;
    uint64_t clusters;
  };
  std::vector<Moved> moved;
  bool wrote_tables = false;
  for (Bitmap* b : stored) {
    const uint64_t n = b->table.size();
    const uint64_t clusters = CeilDiv(n * spec::kBitmapTableEntrySize, cs);
    auto same = [&](uint64_t i) { return i < b->disk_table.size() && b->table[i] == b->disk_table[i]; };
    if (clusters <= b->table_clusters) {
      for (uint64_t i = 0; i < n;) {
        if (same(i)) {
          ++i;
          continue;
        }
        uint64_t j = i;
        while (j < n && !same(j)) ++j;
        std::vector<uint8_t> raw((j - i) * spec::kBitmapTableEntrySize);
        for (uint64_t k = i; k < j; ++k) StoreBE64(raw.data() + (k - i) * spec::kBitmapTableEntrySize, b->table[k]);
        CO_RETURN_IF_ERROR(
            co_await file.Write(b->entry.bitmap_table_offset + i * spec::kBitmapTableEntrySize, raw));
        wrote_tables = true;
        i = j;
      }
      continue;
    }
    absl::StatusOr<uint64_t> fresh = co_await refcounts.Allocate(clusters);
    if (!fresh.ok()) co_return Annotate(fresh.status(), storing);
    absl::Status added = metadata.Add(MetadataKind::kBitmapTable, *fresh, n * spec::kBitmapTableEntrySize);
    if (!added.ok()) {
      co_return absl::DataLossError(absl::StrFormat("%s: the new table of %s: %s", storing, What(*b), added.message()));
    }
    std::vector<uint8_t> raw(clusters * cs, 0);
    for (uint64_t k = 0; k < n; ++k) StoreBE64(raw.data() + k * spec::kBitmapTableEntrySize, b->table[k]);
    CO_RETURN_IF_ERROR(co_await file.Write(*fresh, raw));
    wrote_tables = true;
    moved.push_back({b, *fresh, clusters});
  }
  if (wrote_tables) {
    CO_RETURN_IF_ERROR(co_await refcounts.WriteBack());
    CO_RETURN_IF_ERROR(co_await file.Flush());
  }

  // 3. A moved table: its offset, alone, while the size is still the old
  // one (which the new table covers: it is larger).
  std::vector<std::pair<uint64_t, uint64_t>> frees;  // (offset, clusters)
  if (!moved.empty()) {
    for (const Moved& m : moved) {
      uint8_t* field = directory_.data() + m.b->entry.position + spec::kBitmapDirOffTableOffset;
      StoreBE64(field, m.offset);
      CO_RETURN_IF_ERROR(co_await file.Write(directory_offset_ + m.b->entry.position + spec::kBitmapDirOffTableOffset,
                                             std::span<const uint8_t>(field, 8)));
    }
    CO_RETURN_IF_ERROR(co_await file.Flush());
    for (const Moved& m : moved) {
      frees.emplace_back(m.b->entry.bitmap_table_offset, m.b->table_clusters);
      metadata.Remove(MetadataKind::kBitmapTable, m.b->entry.bitmap_table_offset);
      m.b->entry.bitmap_table_offset = m.offset;
      m.b->table_clusters = m.clusters;
    }
  }

  // 4. Sizes and flags: consistent from this barrier on.
  for (Bitmap* b : stored) {
    StoreBE32(directory_.data() + b->entry.position + spec::kBitmapDirOffTableSize,
              static_cast<uint32_t>(b->table.size()));
    SetFlags(*b, b->entry.flags & ~spec::kBitmapFlagInUse);
  }
  absl::Status written = co_await WriteDirectory();
  if (!written.ok()) {
    // The cleared flags may be in the page cache now; put the marks back
    // there at least (the barrier that failed has latched the file).
    for (Bitmap* b : stored) SetFlags(*b, b->entry.flags | spec::kBitmapFlagInUse);
    (void)co_await context_.file->Write(directory_offset_, directory_);
    co_return Annotate(written, storing);
  }

  // 5. What is no longer reached: data past a shrunken end, table clusters
  // a smaller table no longer needs.
  for (Bitmap* b : stored) {
    const uint64_t n = b->table.size();
    for (uint64_t i = n; i < b->disk_table.size(); ++i) {
      const uint64_t host = b->disk_table[i] & spec::kBitmapTableOffsetMask;
      if (host == 0) continue;
      frees.emplace_back(host, 1);
      metadata.Remove(MetadataKind::kBitmapData, host);
    }
    const uint64_t clusters = CeilDiv(n * spec::kBitmapTableEntrySize, cs);
    if (clusters < b->table_clusters) {
      frees.emplace_back(b->entry.bitmap_table_offset + clusters * cs, b->table_clusters - clusters);
      b->table_clusters = clusters;
    }
    metadata.Move(MetadataKind::kBitmapTable, b->entry.bitmap_table_offset, b->entry.bitmap_table_offset,
                  n * spec::kBitmapTableEntrySize);
    b->entry.bitmap_table_size = static_cast<uint32_t>(n);
    b->disk_table = b->table;
    std::fill(b->changed.begin(), b->changed.end(), 0);
    b->marked = false;
  }
  if (frees.empty()) co_return absl::OkStatus();
  for (auto [offset, clusters] : frees) {
    CO_RETURN_IF_ERROR(co_await refcounts.Update(offset, clusters, -1));
  }
  CO_RETURN_IF_ERROR(co_await refcounts.WriteBack());
  co_return co_await file.Flush();
}

bool DirtyBitmaps::marked() const {
  return std::any_of(bitmaps_.begin(), bitmaps_.end(), [](const std::unique_ptr<Bitmap>& b) { return b->marked; });
}

std::vector<DirtyBitmaps::Description> DirtyBitmaps::Describe() const {
  std::vector<Description> out;
  for (const std::unique_ptr<Bitmap>& b : bitmaps_) out.push_back({b->entry.name, b->state, b->loaded, b->why});
  return out;
}

}  // namespace qcow2fuse
