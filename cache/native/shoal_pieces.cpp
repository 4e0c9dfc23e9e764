// A DuckDB file system over byte ranges that Shoal holds in memory.
//
// DuckDB reads a Parquet file through a Python (fsspec) file system with a call
// into Python, under the GIL, for every read; a peer-warm client spends most of
// its extra time there and in the copies it makes.  This extension lets DuckDB
// read, natively, the byte ranges Shoal has prefetched for a query: Shoal
// registers each file (its size) and each range as it is requested; when the
// range's bytes arrive (verified by Shoal) it hands over their address, and a
// DuckDB thread that wanted them meanwhile waits without holding the GIL.  A
// read of bytes not registered, or of a range whose fetch failed, is passed to
// a callback into Shoal's cached file system (the ordinary read path): nothing
// is ever read from memory Shoal has not filled.
//
// Paths are "shoalpieces://<query token>/<url>"; Shoal drops a query's files
// once DuckDB is done with them, and keeps the memory alive until then.

#include "duckdb.hpp"
#include "duckdb/common/file_system.hpp"
#include "duckdb/main/extension/extension_loader.hpp"

#include <algorithm>
#include <atomic>
#include <chrono>
#include <condition_variable>
#include <cstring>
#include <memory>
#include <mutex>
#include <new>
#include <pthread.h>
#include <unordered_map>
#include <vector>

using namespace duckdb;

namespace {

constexpr const char *PREFIX = "shoalpieces://";

struct Range {
	uint64_t lo;
	uint64_t hi;
	int state = 0; // 0 pending, 1 filled, 2 failed (guarded by g_mutex)
	const char *data = nullptr;
};

struct File {
	uint64_t size = 0;
	std::vector<std::shared_ptr<Range>> ranges; // sorted by lo before a lookup
	bool sorted = true;
	uint64_t max_length = 0; // of its ranges
	// False while Shoal may still register ranges (it plans a file's column chunks
	// from its footer while DuckDB reads that footer): a read of bytes not
	// registered yet waits for them until then.
	bool complete = true;
};

typedef int (*fallback_fn)(const char *path, uint64_t offset, uint64_t length, void *dest);

std::mutex g_mutex;
std::condition_variable g_filled;
std::unordered_map<std::string, std::shared_ptr<File>> g_files;
std::unordered_map<int64_t, std::shared_ptr<Range>> g_ids;
int64_t g_next_id = 1;
fallback_fn g_fallback = nullptr;
double g_wait_seconds = 60.0;
std::atomic<uint64_t> g_native_reads {0}, g_native_bytes {0}, g_fallback_reads {0}, g_fallback_bytes {0},
    g_waits {0}, g_uncovered {0};

std::shared_ptr<File> FindFile(const std::string &path) {
	std::lock_guard<std::mutex> guard(g_mutex);
	auto it = g_files.find(path);
	return it == g_files.end() ? nullptr : it->second;
}

class PiecesHandle : public FileHandle {
public:
	PiecesHandle(FileSystem &fs, const string &path, std::shared_ptr<File> file)
	    : FileHandle(fs, path, FileOpenFlags::FILE_FLAGS_READ), file(std::move(file)) {
	}
	void Close() override {
	}
	std::shared_ptr<File> file;
	idx_t position = 0;
};

// The registered range holding byte ``position`` that reaches furthest, or null.
std::shared_ptr<Range> Holding(File &file, uint64_t position) {
	auto &ranges = file.ranges;
	// Ranges may overlap (a footer's tail and the chunks in it): of those starting at or
	// before the position, only ones starting within max_length of it can hold it.
	auto it = std::upper_bound(ranges.begin(), ranges.end(), position,
	                           [](uint64_t value, const std::shared_ptr<Range> &r) { return value < r->lo; });
	std::shared_ptr<Range> best;
	while (it != ranges.begin()) {
		--it;
		if ((*it)->lo + file.max_length <= position) {
			break;
		}
		if ((*it)->hi > position && (!best || (*it)->hi > best->hi)) {
			best = *it;
		}
	}
	return best;
}

// The ranges covering [offset, offset + length) one after another, or empty.
std::vector<std::shared_ptr<Range>> Cover(File &file, uint64_t offset, uint64_t length) {
	if (!file.sorted) {
		std::sort(file.ranges.begin(), file.ranges.end(),
		          [](const std::shared_ptr<Range> &a, const std::shared_ptr<Range> &b) { return a->lo < b->lo; });
		file.sorted = true;
	}
	std::vector<std::shared_ptr<Range>> out;
	uint64_t position = offset, end = offset + length;
	while (position < end) {
		auto range = Holding(file, position);
		if (!range) {
			return {};
		}
		out.push_back(range);
		position = range->hi;
	}
	return out;
}

class PiecesFileSystem : public FileSystem {
public:
	string GetName() const override {
		return "ShoalPiecesFileSystem";
	}
	bool CanHandleFile(const string &path) override {
		return StringUtil::StartsWith(path, PREFIX);
	}
	unique_ptr<FileHandle> OpenFile(const string &path, FileOpenFlags flags, optional_ptr<FileOpener> opener) override {
		if (flags.OpenForWriting()) {
			throw IOException("%s is read-only", path);
		}
		auto file = FindFile(path);
		if (!file) {
			throw IOException("Shoal holds no bytes of %s (the query that registered it has ended)", path);
		}
		return make_uniq<PiecesHandle>(*this, path, std::move(file));
	}
	void Read(FileHandle &handle, void *buffer, int64_t nr_bytes, idx_t location) override {
		auto &h = handle.Cast<PiecesHandle>();
		if (nr_bytes <= 0) {
			return;
		}
		uint64_t offset = location, length = uint64_t(nr_bytes);
		std::vector<std::shared_ptr<Range>> cover;
		{
			std::unique_lock<std::mutex> lock(g_mutex);
			bool waited = false;
			auto deadline = std::chrono::steady_clock::now() + std::chrono::duration<double>(g_wait_seconds);
			cover = Cover(*h.file, offset, length);
			while (cover.empty() && !h.file->complete) {
				waited = true;
				if (g_filled.wait_until(lock, deadline) == std::cv_status::timeout) {
					break;
				}
				cover = Cover(*h.file, offset, length);
			}
			if (cover.empty()) {
				g_uncovered++;
			}
			for (auto &range : cover) {
				while (range->state == 0) {
					waited = true;
					if (g_filled.wait_until(lock, deadline) == std::cv_status::timeout && range->state == 0) {
						break;
					}
				}
				if (range->state != 1) {
					cover.clear();
					break;
				}
			}
			if (waited) {
				g_waits++;
			}
		}
		if (cover.empty()) {
			Fallback(h, buffer, offset, length);
			return;
		}
		// Filled ranges never change and their memory lives until the file is dropped.
		char *out = static_cast<char *>(buffer);
		uint64_t position = offset, end = offset + length;
		for (auto &range : cover) {
			uint64_t take = std::min(end, range->hi) - position;
			std::memcpy(out, range->data + (position - range->lo), take);
			out += take;
			position += take;
		}
		g_native_reads++;
		g_native_bytes += length;
	}
	int64_t Read(FileHandle &handle, void *buffer, int64_t nr_bytes) override {
		auto &h = handle.Cast<PiecesHandle>();
		auto available = int64_t(h.file->size) - int64_t(h.position);
		nr_bytes = std::max<int64_t>(0, std::min(nr_bytes, available));
		Read(handle, buffer, nr_bytes, h.position);
		h.position += nr_bytes;
		return nr_bytes;
	}
	int64_t GetFileSize(FileHandle &handle) override {
		return int64_t(handle.Cast<PiecesHandle>().file->size);
	}
	timestamp_t GetLastModifiedTime(FileHandle &handle) override {
		return Timestamp::FromEpochSeconds(0); // versions are in the path's query token
	}
	string GetVersionTag(FileHandle &handle) override {
		return "";
	}
	FileType GetFileType(FileHandle &handle) override {
		return FileType::FILE_TYPE_REGULAR;
	}
	bool FileExists(const string &filename, optional_ptr<FileOpener> opener) override {
		return FindFile(filename) != nullptr;
	}
	bool OnDiskFile(FileHandle &handle) override {
		// Memory reads like a local disk: DuckDB then reads each column chunk as it
		// is (a "remote" file gets row groups' chunks merged across small gaps,
		// which holds bytes of columns nobody prefetched).
		return true;
	}
	bool CanSeek() override {
		return true;
	}
	bool TryGetNetworkThroughput(FileHandle &handle, NetworkThroughputEstimate &result) override {
		// DuckDB merges a row group's chunk reads across gaps of latency x bandwidth,
		// and would otherwise measure these reads, where one waiting for bytes in
		// flight looks slow: a merged read would then span bytes nobody prefetched
		// (a fallback through Python).  16 KB (its default gap) stays below the
		// 64 KiB within which Shoal's prefetch merges neighbouring ranges.
		result.latency_seconds = 1.6e-6;
		result.bandwidth_bytes_per_s = 1e10;
		return true;
	}
	void Seek(FileHandle &handle, idx_t location) override {
		handle.Cast<PiecesHandle>().position = location;
	}
	idx_t SeekPosition(FileHandle &handle) override {
		return handle.Cast<PiecesHandle>().position;
	}
	vector<OpenFileInfo> Glob(const string &path, FileOpener *opener) override {
		vector<OpenFileInfo> out;
		if (FindFile(path)) {
			out.emplace_back(path);
		}
		return out;
	}

private:
	void Fallback(PiecesHandle &h, void *buffer, uint64_t offset, uint64_t length) {
		fallback_fn fallback;
		{
			std::lock_guard<std::mutex> guard(g_mutex);
			fallback = g_fallback;
		}
		if (!fallback || fallback(h.path.c_str(), offset, length, buffer) != 0) {
			throw IOException("Shoal could not read bytes %llu-%llu of %s", (unsigned long long)offset,
			                  (unsigned long long)(offset + length), h.path);
		}
		g_fallback_reads++;
		g_fallback_bytes += length;
	}
};

} // namespace

extern "C" {

DUCKDB_EXTENSION_API int shoal_pieces_add_file(const char *path, uint64_t size, int complete) {
	std::lock_guard<std::mutex> guard(g_mutex);
	auto file = std::make_shared<File>();
	file->size = size;
	file->complete = complete != 0;
	g_files[path] = std::move(file);
	return 0;
}

// No more ranges of the file will be registered: reads of bytes outside them fall back.
DUCKDB_EXTENSION_API void shoal_pieces_complete_file(const char *path) {
	{
		std::lock_guard<std::mutex> guard(g_mutex);
		auto it = g_files.find(path);
		if (it != g_files.end()) {
			it->second->complete = true;
		}
	}
	g_filled.notify_all();
}

DUCKDB_EXTENSION_API int64_t shoal_pieces_add_range(const char *path, uint64_t lo, uint64_t hi) {
	std::lock_guard<std::mutex> guard(g_mutex);
	auto it = g_files.find(path);
	if (it == g_files.end() || hi <= lo || hi > it->second->size) {
		return -1;
	}
	auto range = std::make_shared<Range>();
	range->lo = lo;
	range->hi = hi;
	it->second->ranges.push_back(range);
	it->second->sorted = false;
	it->second->max_length = std::max(it->second->max_length, hi - lo);
	auto id = g_next_id++;
	g_ids[id] = range;
	if (!it->second->complete) {
		g_filled.notify_all(); // a reader may be waiting for this range to be registered
	}
	return id;
}

// The range's bytes are at ``data`` (exactly hi - lo of them), which the caller keeps
// alive until the file is dropped; or, with ``data`` null, its fetch failed.
DUCKDB_EXTENSION_API void shoal_pieces_settle(int64_t id, const void *data) {
	{
		std::lock_guard<std::mutex> guard(g_mutex);
		auto it = g_ids.find(id);
		if (it == g_ids.end()) {
			return;
		}
		it->second->data = static_cast<const char *>(data);
		it->second->state = data ? 1 : 2;
		g_ids.erase(it);
	}
	g_filled.notify_all();
}

DUCKDB_EXTENSION_API void shoal_pieces_drop_file(const char *path) {
	std::lock_guard<std::mutex> guard(g_mutex);
	auto it = g_files.find(path);
	if (it == g_files.end()) {
		return;
	}
	for (auto &range : it->second->ranges) {
		if (range->state == 0) {
			range->state = 2; // a reader still waiting (it should not be) falls back
		}
	}
	it->second->complete = true;
	g_files.erase(it);
	g_filled.notify_all();
}

DUCKDB_EXTENSION_API void shoal_pieces_configure(fallback_fn fallback, double wait_seconds) {
	std::lock_guard<std::mutex> guard(g_mutex);
	g_fallback = fallback;
	g_wait_seconds = wait_seconds;
}

// native reads, native bytes, fallback reads, fallback bytes, reads that waited, of the
// fallback reads those of bytes not registered
DUCKDB_EXTENSION_API void shoal_pieces_stats(uint64_t *out) {
	out[5] = g_uncovered;
	out[0] = g_native_reads;
	out[1] = g_native_bytes;
	out[2] = g_fallback_reads;
	out[3] = g_fallback_bytes;
	out[4] = g_waits;
}

// A child forked while another thread held the registry's lock (a DataLoader worker
// forked during a query) would wait forever on its first read: the lock is taken
// around fork and released on both sides, and the child starts with a fresh
// condition variable (the waiters it knew of are threads it does not have).
static void LockForFork() {
	g_mutex.lock();
}
static void UnlockInParent() {
	g_mutex.unlock();
}
static void UnlockInChild() {
	new (&g_filled) std::condition_variable();
	g_mutex.unlock();
}

DUCKDB_CPP_EXTENSION_ENTRY(shoal_pieces, loader) {
	static std::once_flag at_fork;
	std::call_once(at_fork, [] { pthread_atfork(LockForFork, UnlockInParent, UnlockInChild); });
	loader.GetDatabaseInstance().GetFileSystem().RegisterSubSystem(make_uniq<PiecesFileSystem>());
}

} // extern "C"
