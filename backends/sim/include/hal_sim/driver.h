// hal_sim/driver.h: main() of the sanitizer driver. Sanitized code cannot be loaded into a plain
// Python process, so in the "tsan" and "asan" modes the executor builds the kernel file, its entry
// points and the runtime into an executable with this main and runs one launch per process:
//   driver REQUEST RESPONSE
// REQUEST (written by executor.py, little endian): "HALSIMQ1", int32 entry, uint32 grid[3],
// uint32 block[3], uint64 shared_bytes, int32 nargs, int32 nbuffers, then per buffer uint64 nbytes
// and the bytes, then per argument int32 kind, size, elem_size, elem_kind, buffer (-1: none),
// uint32 desc length, desc, and `size` value bytes for scalars.
// RESPONSE: "HALSIMR1", int32 status, uint32 message length, message, int32 count, then per buffer
// written back: int32 index, uint64 nbytes, bytes.
// The driver allocates every buffer itself with exactly its size (so ASan knows the bounds),
// copies the inputs in, launches, and writes back the buffers bound to non-const pointers.
#pragma once
#include <cstdio>
#include <cstdlib>
#include <string>
#include <vector>
#include <unistd.h>

extern "C" void hal_sim_shutdown();

namespace hal_sim::driver {
struct Reader {
    std::vector<char> data;
    size_t at = 0;
    bool ok = true;
    template <class T>
    T get() {
        T v{};
        if (at + sizeof(T) > data.size()) { ok = false; return v; }
        std::memcpy(&v, data.data() + at, sizeof(T));
        at += sizeof(T);
        return v;
    }
    const char* take(size_t n) {
        if (at + n > data.size()) { ok = false; return nullptr; }
        const char* p = data.data() + at;
        at += n;
        return p;
    }
};
}  // namespace hal_sim::driver

int main(int argc, char** argv) {
    using namespace hal_sim;
    if (argc != 3) { fprintf(stderr, "usage: %s REQUEST RESPONSE\n", argv[0]); return 2; }
    driver::Reader r;
    {
        FILE* f = fopen(argv[1], "rb");
        if (!f) { perror(argv[1]); return 2; }
        char buf[1 << 16];
        size_t n;
        while ((n = fread(buf, 1, sizeof buf, f)) > 0) r.data.insert(r.data.end(), buf, buf + n);
        fclose(f);
    }
    const char* magic = r.take(8);
    if (!magic || std::memcmp(magic, "HALSIMQ1", 8) != 0) { fprintf(stderr, "hal_sim driver: bad request\n"); return 2; }
    LaunchDesc d{};
    int entry = r.get<int32_t>();
    for (auto& g : d.grid) g = r.get<uint32_t>();
    for (auto& b : d.block) b = r.get<uint32_t>();
    d.shared_bytes = r.get<uint64_t>();
    d.nargs = r.get<int32_t>();
    int nbuffers = r.get<int32_t>();
    std::vector<void*> buffers(size_t(nbuffers > 0 ? nbuffers : 0));
    std::vector<uint64_t> sizes(buffers.size());
    for (size_t i = 0; i < buffers.size(); ++i) {
        sizes[i] = r.get<uint64_t>();
        const char* src = r.take(sizes[i]);
        // 256-byte aligned like cudaMalloc; ASan poisons everything past the last byte.
        if (posix_memalign(&buffers[i], 256, sizes[i] ? sizes[i] : 1) != 0) { fprintf(stderr, "hal_sim driver: out of memory\n"); return 2; }
        if (src) std::memcpy(buffers[i], src, sizes[i]);
    }
    std::vector<ArgDesc> args(size_t(d.nargs > 0 ? d.nargs : 0));
    std::vector<std::string> descs(args.size());
    std::vector<int> bound(args.size(), -1);
    std::vector<void*> slots(args.size(), nullptr);
    std::vector<std::vector<char>> values(args.size());
    for (size_t i = 0; i < args.size(); ++i) {
        args[i].kind = r.get<int32_t>();
        args[i].size = r.get<int32_t>();
        args[i].elem_size = r.get<int32_t>();
        args[i].elem_kind = r.get<int32_t>();
        bound[i] = r.get<int32_t>();
        uint32_t dl = r.get<uint32_t>();
        const char* dp = r.take(dl);
        descs[i] = dp ? std::string(dp, dl) : std::string();
        args[i].desc = descs[i].c_str();
        if (args[i].kind == kArray || args[i].kind == kNull) {
            slots[i] = (bound[i] >= 0 && size_t(bound[i]) < buffers.size()) ? buffers[size_t(bound[i])] : nullptr;
            args[i].value = &slots[i];
        } else {
            const char* vp = r.take(size_t(args[i].size));
            values[i].assign(vp ? vp : "", vp ? vp + args[i].size : nullptr);
            args[i].value = values[i].data();
        }
    }
    if (!r.ok || entry < 0 || entry >= int(sizeof(hal_sim_entries) / sizeof(hal_sim_entries[0]))) {
        fprintf(stderr, "hal_sim driver: truncated or invalid request\n");
        return 2;
    }
    d.args = args.data();
    std::vector<char> error(1 << 16, 0);
    d.error = error.data();
    d.error_size = error.size();
    int status = hal_sim_entries[entry](&d);
    std::vector<int32_t> kinds(args.size() + 1, 0);
    int np = hal_sim_infos[entry](kinds.data(), int32_t(kinds.size()));
    std::vector<bool> written(buffers.size(), false);
    for (size_t i = 0; i < args.size() && int(i) < np; ++i)
        if (kinds[i] == 2 && bound[i] >= 0) written[size_t(bound[i])] = true;
    FILE* out = fopen(argv[2], "wb");
    if (!out) { perror(argv[2]); return 2; }
    uint32_t ml = uint32_t(strlen(error.data()));
    int32_t count = 0;
    for (bool w : written) count += w;
    fwrite("HALSIMR1", 1, 8, out);
    fwrite(&status, 4, 1, out);
    fwrite(&ml, 4, 1, out);
    fwrite(error.data(), 1, ml, out);
    fwrite(&count, 4, 1, out);
    for (size_t i = 0; i < buffers.size(); ++i) {
        if (!written[i]) continue;
        int32_t idx = int32_t(i);
        fwrite(&idx, 4, 1, out);
        fwrite(&sizes[i], 8, 1, out);
        fwrite(buffers[i], 1, sizes[i], out);
    }
    fclose(out);
    for (void* b : buffers) free(b);
    hal_sim_shutdown();
    fflush(stderr);
    _exit(0);  // helper workers are parked forever: skip static destructors
}
