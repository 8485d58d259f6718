// Host-only check (no GPU) of the persistent tile schedule in fa3_fwd_kernel.cuh: tile_of and
// decode_tile, run for every CTA of the grid the launcher would start, must visit every
// (m block, head, batch) tile exactly once; with longest-first groups (causal) the two tiles of a
// pair must be one head's m blocks i and n-1-i, so that every pair costs about the same number of
// key blocks (square causal: n + 1) and the CTAs stay in step.  Build as layout_check.cu.
// Prints "OK" per case and exits 0 when all hold.
#include <cstdio>
#include <vector>
#define CUTE_SM90_EXTENDED_MMA_SHAPES_ENABLED 1
#include "fa3_fwd_kernel.cuh"

struct Grid {
  int num_m_blocks, hq, b, reverse_m;
};

int check(Grid g, int sms) {
  int const num_tiles = g.num_m_blocks * g.hq * g.b;
  int64_t const units = fa3::schedule_units(g);
  int const ncta = int(units < sms ? units : sms);
  std::vector<int> seen(num_tiles, 0);
  int bad = 0;
  for (int cta = 0; cta < ncta; ++cta) {
    for (int k = 0;; ++k) {
      int const t = fa3::tile_of(g, k, cta, ncta);
      if (t >= num_tiles) break;  // past this CTA's last tile
      if (t == fa3::kSkipTile) continue;
      if (t < 0) { if (bad++ < 5) printf("tile %d out of range\n", t); continue; }
      ++seen[t];
      // a pair's halves are one head's tiles, ranks j and n-1-j
      if (g.reverse_m > 0 && (k & 1)) {
        int const t0 = fa3::tile_of(g, k - 1, cta, ncta);
        fa3::TileCoord a = fa3::decode_tile(g, t0), c = fa3::decode_tile(g, t);
        if (a.head != c.head || a.batch != c.batch || a.m_block + c.m_block != g.num_m_blocks - 1) {
          if (bad++ < 5) printf("pair (%d,%d,%d) (%d,%d,%d)\n", a.m_block, a.head, a.batch, c.m_block, c.head, c.batch);
        }
      }
    }
  }
  for (int t = 0; t < num_tiles; ++t) {
    if (seen[t] != 1 && bad++ < 5) printf("tile %d seen %d times\n", t, seen[t]);
  }
  // every coordinate decodes inside the grid, each exactly once
  std::vector<int> coord(num_tiles, 0);
  for (int t = 0; t < num_tiles; ++t) {
    fa3::TileCoord c = fa3::decode_tile(g, t);
    if (c.m_block < 0 || c.m_block >= g.num_m_blocks || c.head < 0 || c.head >= g.hq || c.batch < 0 || c.batch >= g.b) {
      if (bad++ < 5) printf("tile %d decodes outside\n", t);
      continue;
    }
    ++coord[(c.batch * g.hq + c.head) * g.num_m_blocks + c.m_block];
  }
  for (int i = 0; i < num_tiles; ++i) {
    if (coord[i] != 1 && bad++ < 5) printf("coordinate %d decoded %d times\n", i, coord[i]);
  }
  printf("%s n=%d hq=%d b=%d G=%d ctas=%d\n", bad ? "FAIL" : "OK", g.num_m_blocks, g.hq, g.b, g.reverse_m, ncta);
  return bad;
}

int main() {
  int bad = 0;
  // (m blocks, heads, batch, group) as the launcher sees them: 2k d128 causal (b 8, h 16, 16
  // heads per group); odd block counts; one head; more CTAs than pairs; no groups (unmasked).
  Grid cases[] = {{16, 16, 8, 16}, {15, 16, 8, 16}, {1, 3, 1, 1}, {7, 5, 3, 15}, {128, 16, 1, 4},
                  {3, 1, 1, 1}, {16, 16, 8, 0}, {9, 7, 2, 0}};
  for (Grid g : cases) bad += check(g, 132);
  return bad ? 1 : 0;
}
