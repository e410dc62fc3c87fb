/* rope: rotary position embedding, NeoX (interleaved = 0) or GPT-J (interleaved = 1) pairs.

   One work-item per output element (dim 0: element j of the head, dim 1: head, dim 2: token);
   it reads its own element and its pair partner and writes only itself, so every output element
   is written exactly once, dimensions from rotary_dim on are copied through, and no local memory
   or barrier is needed. The launcher calls it once for q and once for k and leaves the
   work-group size to the runtime.

   Build options: X_KIND (q/k and outputs), T_KIND (cos/sin tables), POS_T (int or long).
*/
__kernel void rope(__global const TYPE(X_KIND) *x, __global TYPE(X_KIND) *y, __global const TYPE(T_KIND) *cos_t,
                   __global const TYPE(T_KIND) *sin_t, __global const POS_T *positions, const int heads,
                   const int head, const int rotary, const int interleaved) {
    const int j = get_global_id(0), h = get_global_id(1), t = get_global_id(2);
    if (j >= head) return;
    const size_t row = ((size_t)t * heads + h) * head;
    const float xj = LOAD(X_KIND, x, row + j);
    if (j >= rotary) {
        STORE(X_KIND, y, row + j, xj);
        return;
    }
    const int pairs = rotary / 2;
    int i, partner, first;
    if (interleaved) {
        i = j / 2;
        first = (j & 1) == 0;
        partner = j ^ 1;
    } else {
        first = j < pairs;
        i = first ? j : j - pairs;
        partner = first ? j + pairs : j - pairs;
    }
    const size_t at = (size_t)positions[t] * pairs + i;
    const float c = LOAD(T_KIND, cos_t, at), s = LOAD(T_KIND, sin_t, at);
    const float xp = LOAD(X_KIND, x, row + partner);
    /* (x1, x2) -> (x1 c - x2 s, x2 c + x1 s) */
    STORE(X_KIND, y, row + j, first ? xj * c - xp * s : xj * c + xp * s);
}
