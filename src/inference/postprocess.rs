//! Largest-connected-component post-processing: each organ is one structure, so
//! its smaller islands are false positives and go back to background.

use ndarray::Array3;

/// Keeps, for every label > 0, only its largest 26-connected component.
pub fn keep_largest_components(labels: &mut Array3<u8>) {
    let shape = [labels.shape()[0], labels.shape()[1], labels.shape()[2]];
    let n: usize = shape.iter().product();
    let data = labels.as_slice_mut().expect("standard layout");
    let mut component = vec![0u32; n];
    // Per component: its label and size.
    let mut comps: Vec<(u8, usize)> = vec![(0, 0)];
    let mut stack = Vec::new();
    let idx = |z: usize, y: usize, x: usize| (z * shape[1] + y) * shape[2] + x;
    for start in 0..n {
        let l = data[start];
        if l == 0 || component[start] != 0 {
            continue;
        }
        let id = comps.len() as u32;
        let mut size = 0;
        component[start] = id;
        stack.push(start);
        while let Some(i) = stack.pop() {
            size += 1;
            let (z, y, x) = (i / (shape[1] * shape[2]), (i / shape[2]) % shape[1], i % shape[2]);
            for dz in -1i64..=1 {
                for dy in -1i64..=1 {
                    for dx in -1i64..=1 {
                        let (nz, ny, nx) = (z as i64 + dz, y as i64 + dy, x as i64 + dx);
                        if nz < 0
                            || ny < 0
                            || nx < 0
                            || nz >= shape[0] as i64
                            || ny >= shape[1] as i64
                            || nx >= shape[2] as i64
                        {
                            continue;
                        }
                        let j = idx(nz as usize, ny as usize, nx as usize);
                        if data[j] == l && component[j] == 0 {
                            component[j] = id;
                            stack.push(j);
                        }
                    }
                }
            }
        }
        comps.push((l, size));
    }
    let mut largest = [0u32; 256];
    let mut best = [0usize; 256];
    for (id, &(l, size)) in comps.iter().enumerate().skip(1) {
        if size > best[l as usize] {
            best[l as usize] = size;
            largest[l as usize] = id as u32;
        }
    }
    for (v, &c) in data.iter_mut().zip(&component) {
        if *v != 0 && c != largest[*v as usize] {
            *v = 0;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn small_islands_of_each_organ_are_removed() {
        let mut a = Array3::<u8>::zeros((10, 10, 10));
        for z in 1..5 {
            for y in 1..5 {
                for x in 1..5 {
                    a[[z, y, x]] = 1; // big liver
                }
            }
        }
        a[[8, 8, 8]] = 1; // liver island
        a[[8, 1, 1]] = 2; // the only kidney voxel: kept
        a[[5, 5, 5]] = 1; // touches the big liver diagonally: same component
        keep_largest_components(&mut a);
        assert_eq!(a[[8, 8, 8]], 0);
        assert_eq!(a[[8, 1, 1]], 2);
        assert_eq!(a[[5, 5, 5]], 1);
        assert_eq!(a.iter().filter(|&&v| v == 1).count(), 64 + 1);
    }
}
