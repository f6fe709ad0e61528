//! Images for SwAV: a set of square images held as bytes (an image folder, or the 8×8 digits of
//! scikit-learn), and SwAV's multi-crop augmentation producing the views of a micro-batch.
//!
//! A micro-batch is drawn deterministically from (run seed, peer, epoch, index) like the text
//! pipeline's: [`Sampler::views`].

use std::io::Read;
use std::path::{Path, PathBuf};

use rand::Rng;
use rand::rngs::StdRng;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use super::mlm::Sampler;

#[derive(Debug, thiserror::Error)]
pub enum ImageError {
    #[error("{path}: {source}")]
    Io {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path}, line {line}: {why}")]
    Csv {
        path: PathBuf,
        line: usize,
        why: String,
    },
    #[error("{path}: not a readable image: {why}")]
    Decode { path: PathBuf, why: String },
    #[error("{0}: no images found (looked for .png, .jpg, .jpeg, .bmp, .gif, .webp, .tif files)")]
    Empty(PathBuf),
}

/// Square images of one size and channel count, as bytes (0–255), channel-major.
#[derive(Debug, Clone, PartialEq)]
pub struct ImageSet {
    pub channels: usize,
    pub size: usize,
    pixels: Vec<u8>,
    /// A label per image where the source has them (digits; an image folder's sub-folders).
    pub labels: Vec<Option<u32>>,
    /// Per-channel mean and standard deviation over the set, on the 0–1 scale.
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
    /// SHA-256 of the shapes and pixels, computed once at load.
    fingerprint: [u8; 32],
}

/// Where `scripts/fetch-data.sh` puts the digits: `$COLONY_DIGITS`, or
/// `.cache/data/digits.csv.gz` under the working directory or the source tree.
pub fn default_digits_path() -> std::path::PathBuf {
    if let Some(p) = std::env::var_os("COLONY_DIGITS") {
        return p.into();
    }
    let here = std::path::PathBuf::from(".cache/data/digits.csv.gz");
    if here.exists() {
        return here;
    }
    std::path::PathBuf::from(env!("CARGO_MANIFEST_DIR")).join("../.cache/data/digits.csv.gz")
}

impl ImageSet {
    fn new(channels: usize, size: usize, pixels: Vec<u8>, labels: Vec<Option<u32>>) -> Self {
        let per = channels * size * size;
        let n = pixels.len() / per.max(1);
        let mut mean = vec![0.0f64; channels];
        let mut sq = vec![0.0f64; channels];
        for img in pixels.chunks_exact(per) {
            for (c, plane) in img.chunks_exact(size * size).enumerate() {
                for &p in plane {
                    let x = f64::from(p) / 255.0;
                    mean[c] += x;
                    sq[c] += x * x;
                }
            }
        }
        let count = (n * size * size).max(1) as f64;
        let mean: Vec<f64> = mean.iter().map(|m| m / count).collect();
        let std = sq
            .iter()
            .zip(&mean)
            .map(|(s, m)| ((s / count - m * m).max(0.0).sqrt().max(1e-3)) as f32)
            .collect();
        let mut h = Sha256::new();
        h.update((channels as u64).to_le_bytes());
        h.update((size as u64).to_le_bytes());
        h.update(&pixels);
        Self {
            channels,
            size,
            pixels,
            labels,
            mean: mean.iter().map(|&m| m as f32).collect(),
            std,
            fingerprint: h.finalize().into(),
        }
    }

    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Image `i`: `channels` planes of `size × size` bytes.
    pub fn image(&self, i: usize) -> &[u8] {
        let per = self.channels * self.size * self.size;
        &self.pixels[i * per..(i + 1) * per]
    }

    /// SHA-256 of the shapes and pixels: peers of one run must train on the same set.
    pub fn fingerprint(&self) -> [u8; 32] {
        self.fingerprint
    }

    /// scikit-learn's `digits.csv.gz` (or the same CSV uncompressed): 1797 rows of 64 pixel
    /// values 0–16 and a label.
    pub fn digits(path: &Path) -> Result<Self, ImageError> {
        let io = |source| ImageError::Io {
            path: path.to_path_buf(),
            source,
        };
        let raw = std::fs::read(path).map_err(io)?;
        let text = if raw.starts_with(&[0x1f, 0x8b]) {
            let mut s = String::new();
            flate2::read::GzDecoder::new(&raw[..])
                .read_to_string(&mut s)
                .map_err(io)?;
            s
        } else {
            String::from_utf8(raw).map_err(|_| ImageError::Csv {
                path: path.to_path_buf(),
                line: 0,
                why: "not UTF-8 text".into(),
            })?
        };
        let mut pixels = Vec::new();
        let mut labels = Vec::new();
        for (k, line) in text.lines().enumerate() {
            let line = line.trim();
            if line.is_empty() {
                continue;
            }
            let bad = |why: String| ImageError::Csv {
                path: path.to_path_buf(),
                line: k + 1,
                why,
            };
            let vals: Vec<f64> = line
                .split(',')
                .map(|v| v.trim().parse::<f64>())
                .collect::<Result<_, _>>()
                .map_err(|e| bad(format!("not a number: {e}")))?;
            if vals.len() != 65 {
                return Err(bad(format!(
                    "{} values, want 64 pixels and a label",
                    vals.len()
                )));
            }
            for &v in &vals[..64] {
                if !(0.0..=16.0).contains(&v) {
                    return Err(bad(format!("pixel value {v} outside 0–16")));
                }
                pixels.push((v * 255.0 / 16.0).round() as u8);
            }
            let l = vals[64];
            if !(0.0..=9.0).contains(&l) || l.fract() != 0.0 {
                return Err(bad(format!("label {l} is not a digit")));
            }
            labels.push(Some(l as u32));
        }
        if labels.is_empty() {
            return Err(ImageError::Empty(path.to_path_buf()));
        }
        Ok(Self::new(1, 8, pixels, labels))
    }

    /// Every image file under `dir` (recursively), resized and centre-cropped to `size × size`
    /// RGB. Images in sub-folders take the sub-folder's index (sorted by name) as their label,
    /// as torchvision's `ImageFolder` does. Files that are not images are skipped; a file with an
    /// image extension that does not decode is an error naming it.
    pub fn folder(dir: &Path, size: usize) -> Result<Self, ImageError> {
        let mut files = Vec::new();
        collect_images(dir, &mut files)?;
        files.sort();
        if files.is_empty() {
            return Err(ImageError::Empty(dir.to_path_buf()));
        }
        let mut classes: Vec<PathBuf> = files
            .iter()
            .filter_map(|f| f.parent().map(Path::to_path_buf))
            .filter(|p| p != dir)
            .collect();
        classes.sort();
        classes.dedup();
        let side = u32::try_from(size).unwrap_or(u32::MAX);
        let mut pixels = Vec::with_capacity(files.len() * 3 * size * size);
        let mut labels = Vec::with_capacity(files.len());
        for f in &files {
            let img = image::ImageReader::open(f)
                .map_err(|source| ImageError::Io {
                    path: f.clone(),
                    source,
                })?
                .with_guessed_format()
                .map_err(|source| ImageError::Io {
                    path: f.clone(),
                    source,
                })?
                .decode()
                .map_err(|e| ImageError::Decode {
                    path: f.clone(),
                    why: e.to_string(),
                })?;
            let rgb = img
                .resize_to_fill(side, side, image::imageops::FilterType::Triangle)
                .to_rgb8();
            for c in 0..3 {
                pixels.extend(rgb.pixels().map(|p| p.0[c]));
            }
            labels.push(
                f.parent()
                    .and_then(|p| classes.binary_search(&p.to_path_buf()).ok())
                    .map(|i| i as u32),
            );
        }
        Ok(Self::new(3, size, pixels, labels))
    }
}

fn collect_images(dir: &Path, out: &mut Vec<PathBuf>) -> Result<(), ImageError> {
    let io = |source| ImageError::Io {
        path: dir.to_path_buf(),
        source,
    };
    for entry in std::fs::read_dir(dir).map_err(io)? {
        let p = entry.map_err(io)?.path();
        if p.is_dir() {
            collect_images(&p, out)?;
        } else if p
            .extension()
            .and_then(|e| e.to_str())
            .map(|e| e.to_ascii_lowercase())
            .is_some_and(|e| {
                matches!(
                    e.as_str(),
                    "png" | "jpg" | "jpeg" | "bmp" | "gif" | "webp" | "tif" | "tiff"
                )
            })
        {
            out.push(p);
        }
    }
    Ok(())
}

/// One resolution of crops.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CropSpec {
    pub count: usize,
    pub size: usize,
    /// Range of the crop's area as a fraction of the image's.
    pub min_scale: f32,
    pub max_scale: f32,
}

/// SwAV's multi-crop augmentation: the first crop spec gives the views codes are computed on
/// ("global" crops), the others smaller views that only predict them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Augment {
    pub crops: Vec<CropSpec>,
    pub flip: f32,
    /// Colour jitter: applied with probability `jitter_p`; brightness, contrast and saturation
    /// factors drawn from [1 − s, 1 + s] with s = `jitter`.
    pub jitter: f32,
    pub jitter_p: f32,
    /// Probability of turning a colour crop grey.
    pub gray_p: f32,
    /// Probability of a Gaussian blur (σ from 0.1 to 2 pixels at 224, scaled with the crop)
    /// on the global crops.
    pub blur_p: f32,
}

impl Augment {
    /// SwAV's ImageNet recipe: 2×224 (area 14–100%) + 6×96 (5–14%), flips, colour distortion
    /// of strength 0.8, grey 20%, blur 50%.
    pub fn imagenet() -> Self {
        Self::sized(224, 96, 6)
    }

    /// The ImageNet recipe at other crop sizes.
    pub fn sized(global: usize, local: usize, locals: usize) -> Self {
        Self {
            crops: vec![
                CropSpec {
                    count: 2,
                    size: global,
                    min_scale: 0.14,
                    max_scale: 1.0,
                },
                CropSpec {
                    count: locals,
                    size: local,
                    min_scale: 0.05,
                    max_scale: 0.14,
                },
            ],
            flip: 0.5,
            jitter: 0.8,
            jitter_p: 0.8,
            gray_p: 0.2,
            blur_p: 0.5,
        }
    }

    /// For the 8×8 digits: 2×16 (35–100%) + 4×8 (10–35%), no flips (a mirrored digit is
    /// another glyph), brightness/contrast jitter, no blur.
    pub fn digits() -> Self {
        Self {
            crops: vec![
                CropSpec {
                    count: 2,
                    size: 16,
                    min_scale: 0.35,
                    max_scale: 1.0,
                },
                CropSpec {
                    count: 4,
                    size: 8,
                    min_scale: 0.1,
                    max_scale: 0.35,
                },
            ],
            flip: 0.0,
            jitter: 0.4,
            jitter_p: 0.8,
            gray_p: 0.0,
            blur_p: 0.0,
        }
    }

    /// Views per image.
    pub fn views(&self) -> usize {
        self.crops.iter().map(|c| c.count).sum()
    }
}

/// The crops of one resolution: `views × batch` images [C, size, size], view-major (view v of
/// image i at v·batch + i), normalised.
#[derive(Debug, Clone, PartialEq)]
pub struct CropGroup {
    pub size: usize,
    pub views: usize,
    pub data: Vec<f32>,
}

/// A SwAV micro-batch: every view of `batch` images, grouped by resolution (global crops first).
#[derive(Debug, Clone, PartialEq)]
pub struct SwavBatch {
    pub batch: usize,
    pub channels: usize,
    pub groups: Vec<CropGroup>,
}

impl SwavBatch {
    pub fn views(&self) -> usize {
        self.groups.iter().map(|g| g.views).sum()
    }
}

impl Sampler {
    /// Micro-batch `index` of `epoch`: `size` images drawn with replacement, each cut into the
    /// views `aug` asks for.
    pub fn views(
        &self,
        set: &ImageSet,
        aug: &Augment,
        epoch: u64,
        index: u64,
        size: usize,
    ) -> SwavBatch {
        let mut rng = self.rng(epoch, index);
        let picks: Vec<(usize, [u8; 32])> = (0..size)
            .map(|_| (rng.gen_range(0..set.len()), rng.r#gen()))
            .collect();
        // Each image's crops come from its own generator, so images are cut on all cores and
        // the result does not depend on how many there are.
        let per_image = |&(pick, seed): &(usize, [u8; 32])| -> Vec<Vec<f32>> {
            let mut rng = <StdRng as rand::SeedableRng>::from_seed(seed);
            let src = to_unit(set.image(pick));
            let mut out = Vec::with_capacity(aug.views());
            for (g, spec) in aug.crops.iter().enumerate() {
                for _ in 0..spec.count {
                    let mut v = vec![0.0f32; set.channels * spec.size * spec.size];
                    crop(set, &src, spec, aug, g == 0, &mut rng, &mut v);
                    out.push(v);
                }
            }
            out
        };
        let threads = std::thread::available_parallelism()
            .map_or(1, |n| n.get())
            .min(size.max(1));
        let chunk = size.div_ceil(threads).max(1);
        let cut: Vec<Vec<Vec<f32>>> = std::thread::scope(|sc| {
            let handles: Vec<_> = picks
                .chunks(chunk)
                .map(|part| sc.spawn(move || part.iter().map(per_image).collect::<Vec<_>>()))
                .collect();
            handles
                .into_iter()
                .flat_map(|h| h.join().unwrap_or_default())
                .collect()
        });
        let mut view = 0;
        let groups = aug
            .crops
            .iter()
            .map(|spec| {
                let per = set.channels * spec.size * spec.size;
                let mut data = vec![0.0f32; spec.count * size * per];
                for v in 0..spec.count {
                    for (i, views) in cut.iter().enumerate() {
                        let at = (v * size + i) * per;
                        if let Some(src) = views.get(view + v) {
                            data[at..at + per].copy_from_slice(src);
                        }
                    }
                }
                view += spec.count;
                CropGroup {
                    size: spec.size,
                    views: spec.count,
                    data,
                }
            })
            .collect();
        SwavBatch {
            batch: size,
            channels: set.channels,
            groups,
        }
    }

    /// Each image of `set` whole at `size × size`, normalised: the input for feature extraction.
    pub fn whole(set: &ImageSet, indices: &[usize], size: usize) -> SwavBatch {
        let spec = CropSpec {
            count: 1,
            size,
            min_scale: 1.0,
            max_scale: 1.0,
        };
        let per = set.channels * size * size;
        let mut data = vec![0.0f32; indices.len() * per];
        for (k, &i) in indices.iter().enumerate() {
            let src = to_unit(set.image(i));
            resample(
                &src,
                set.channels,
                set.size,
                (0.0, 0.0, set.size as f32, set.size as f32),
                &spec,
                false,
                &mut data[k * per..(k + 1) * per],
            );
            normalise(set, size, &mut data[k * per..(k + 1) * per]);
        }
        SwavBatch {
            batch: indices.len(),
            channels: set.channels,
            groups: vec![CropGroup {
                size,
                views: 1,
                data,
            }],
        }
    }
}

fn to_unit(img: &[u8]) -> Vec<f32> {
    img.iter().map(|&p| f32::from(p) / 255.0).collect()
}

/// One augmented view of an image of `set` (`src`, on the 0–1 scale) into `out` ([C, s, s]).
fn crop(
    set: &ImageSet,
    src: &[f32],
    spec: &CropSpec,
    aug: &Augment,
    global: bool,
    rng: &mut StdRng,
    out: &mut [f32],
) {
    let n = set.size as f32;
    let area = n * n;
    // Random-resized crop: area fraction from the range, aspect ratio log-uniform in [3/4, 4/3].
    let (mut w, mut h) = (n, n);
    for _ in 0..10 {
        let a = area * rng.gen_range(spec.min_scale..=spec.max_scale);
        let ratio = (rng.gen_range((0.75f32).ln()..=(4.0f32 / 3.0).ln())).exp();
        let (cw, ch) = ((a * ratio).sqrt(), (a / ratio).sqrt());
        if cw <= n && ch <= n {
            (w, h) = (cw, ch);
            break;
        }
    }
    let x0 = rng.gen_range(0.0..=(n - w).max(0.0));
    let y0 = rng.gen_range(0.0..=(n - h).max(0.0));
    let flip = rng.r#gen::<f32>() < aug.flip;
    resample(src, set.channels, set.size, (x0, y0, w, h), spec, flip, out);
    let plane = spec.size * spec.size;
    if rng.r#gen::<f32>() < aug.jitter_p && aug.jitter > 0.0 {
        let s = aug.jitter;
        let b = rng.gen_range(1.0 - s..=1.0 + s).max(0.0);
        let c = rng.gen_range(1.0 - s..=1.0 + s).max(0.0);
        let sat = rng.gen_range(1.0 - s..=1.0 + s).max(0.0);
        out.iter_mut().for_each(|x| *x = (*x * b).clamp(0.0, 1.0));
        let m = out.iter().sum::<f32>() / out.len() as f32;
        out.iter_mut()
            .for_each(|x| *x = ((*x - m) * c + m).clamp(0.0, 1.0));
        if set.channels == 3 {
            for p in 0..plane {
                let g = gray(out, plane, p);
                for ch in 0..3 {
                    let x = &mut out[ch * plane + p];
                    *x = ((*x - g) * sat + g).clamp(0.0, 1.0);
                }
            }
        }
    }
    if set.channels == 3 && rng.r#gen::<f32>() < aug.gray_p {
        for p in 0..plane {
            let g = gray(out, plane, p);
            (0..3).for_each(|ch| out[ch * plane + p] = g);
        }
    }
    if global && rng.r#gen::<f32>() < aug.blur_p {
        let sigma = rng.gen_range(0.1f32..=2.0) * spec.size as f32 / 224.0;
        blur(out, set.channels, spec.size, sigma);
    }
    normalise(set, spec.size, out);
}

fn gray(img: &[f32], plane: usize, p: usize) -> f32 {
    0.299 * img[p] + 0.587 * img[plane + p] + 0.114 * img[2 * plane + p]
}

fn normalise(set: &ImageSet, size: usize, out: &mut [f32]) {
    for (c, plane) in out.chunks_exact_mut(size * size).enumerate() {
        let (m, s) = (set.mean[c], set.std[c]);
        plane.iter_mut().for_each(|x| *x = (*x - m) / s);
    }
}

/// Bilinear resampling of the rectangle (x0, y0, w, h) of `src` ([C, n, n]) to `out`
/// ([C, s, s]), mirrored left-right when `flip`.
fn resample(
    src: &[f32],
    channels: usize,
    n: usize,
    (x0, y0, w, h): (f32, f32, f32, f32),
    spec: &CropSpec,
    flip: bool,
    out: &mut [f32],
) {
    let s = spec.size;
    let last = (n - 1) as f32;
    for oy in 0..s {
        let sy = (y0 + (oy as f32 + 0.5) * h / s as f32 - 0.5).clamp(0.0, last);
        let (y_lo, fy) = (sy.floor() as usize, sy.fract());
        let y_hi = (y_lo + 1).min(n - 1);
        for ox in 0..s {
            let tx = if flip { s - 1 - ox } else { ox };
            let sx = (x0 + (tx as f32 + 0.5) * w / s as f32 - 0.5).clamp(0.0, last);
            let (x_lo, fx) = (sx.floor() as usize, sx.fract());
            let x_hi = (x_lo + 1).min(n - 1);
            for c in 0..channels {
                let p = &src[c * n * n..(c + 1) * n * n];
                let top = p[y_lo * n + x_lo] * (1.0 - fx) + p[y_lo * n + x_hi] * fx;
                let bottom = p[y_hi * n + x_lo] * (1.0 - fx) + p[y_hi * n + x_hi] * fx;
                out[c * s * s + oy * s + ox] = top * (1.0 - fy) + bottom * fy;
            }
        }
    }
}

/// Separable Gaussian blur of each plane, edges clamped.
fn blur(img: &mut [f32], channels: usize, s: usize, sigma: f32) {
    let r = (2.0 * sigma).ceil() as isize;
    if r < 1 {
        return;
    }
    let k: Vec<f32> = (-r..=r)
        .map(|i| (-(i * i) as f32 / (2.0 * sigma * sigma)).exp())
        .collect();
    let total: f32 = k.iter().sum();
    let k: Vec<f32> = k.iter().map(|v| v / total).collect();
    let mut tmp = vec![0.0f32; s * s];
    let last = s as isize - 1;
    for c in 0..channels {
        let plane = &mut img[c * s * s..(c + 1) * s * s];
        for y in 0..s {
            for x in 0..s {
                tmp[y * s + x] = (-r..=r)
                    .map(|d| {
                        let xx = (x as isize + d).clamp(0, last) as usize;
                        plane[y * s + xx] * k[(d + r) as usize]
                    })
                    .sum();
            }
        }
        for y in 0..s {
            for x in 0..s {
                plane[y * s + x] = (-r..=r)
                    .map(|d| {
                        let yy = (y as isize + d).clamp(0, last) as usize;
                        tmp[yy * s + x] * k[(d + r) as usize]
                    })
                    .sum();
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)]
    use super::*;

    fn tiny_digits() -> ImageSet {
        let mut csv = String::new();
        for k in 0..10u32 {
            let row: Vec<String> = (0..64)
                .map(|p| ((p + k as usize) % 17).to_string())
                .collect();
            csv.push_str(&format!("{},{}\n", row.join(","), k));
        }
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("d.csv");
        std::fs::write(&p, csv).unwrap();
        ImageSet::digits(&p).unwrap()
    }

    #[test]
    fn digits_csv_reads_and_bad_rows_are_named() {
        let s = tiny_digits();
        assert_eq!((s.len(), s.channels, s.size), (10, 1, 8));
        assert_eq!(s.labels[3], Some(3));
        assert_eq!(s.image(0)[16], 255);
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("bad.csv");
        std::fs::write(&p, "1,2,3\n").unwrap();
        let e = ImageSet::digits(&p).unwrap_err().to_string();
        assert!(e.contains("line 1") && e.contains("3 values"), "{e}");
        let row: Vec<&str> = std::iter::repeat_n("40", 64).collect();
        std::fs::write(&p, format!("{},1\n", row.join(","))).unwrap();
        let e = ImageSet::digits(&p).unwrap_err().to_string();
        assert!(e.contains("outside 0–16"), "{e}");
    }

    #[test]
    fn views_are_deterministic_shaped_and_differ_per_peer() {
        let s = tiny_digits();
        let aug = Augment::digits();
        let a = Sampler {
            run_seed: 1,
            peer: b"a".to_vec(),
        };
        let b1 = a.views(&s, &aug, 2, 5, 4);
        assert_eq!(b1, a.views(&s, &aug, 2, 5, 4));
        assert_eq!(b1.views(), 6);
        assert_eq!(b1.groups[0].data.len(), 2 * 4 * 16 * 16);
        assert_eq!(b1.groups[1].data.len(), 4 * 4 * 8 * 8);
        assert!(
            b1.groups
                .iter()
                .all(|g| g.data.iter().all(|x| x.is_finite()))
        );
        let b = Sampler {
            run_seed: 1,
            peer: b"b".to_vec(),
        };
        assert_ne!(b1, b.views(&s, &aug, 2, 5, 4));
    }

    #[test]
    fn a_whole_crop_without_augmentation_is_the_image() {
        let s = tiny_digits();
        let w = Sampler::whole(&s, &[3], 8);
        let want: Vec<f32> = s
            .image(3)
            .iter()
            .map(|&p| (f32::from(p) / 255.0 - s.mean[0]) / s.std[0])
            .collect();
        for (x, y) in w.groups[0].data.iter().zip(&want) {
            assert!((x - y).abs() < 1e-5);
        }
    }

    #[test]
    fn folder_reads_images_with_class_labels_and_names_a_broken_file() {
        let dir = tempfile::tempdir().unwrap();
        for (class, colour) in [("cats", [200u8, 10, 10]), ("dogs", [10, 10, 200])] {
            std::fs::create_dir(dir.path().join(class)).unwrap();
            let img = image::RgbImage::from_pixel(20, 12, image::Rgb(colour));
            img.save(dir.path().join(class).join("a.png")).unwrap();
        }
        std::fs::write(dir.path().join("notes.txt"), "not an image").unwrap();
        let s = ImageSet::folder(dir.path(), 8).unwrap();
        assert_eq!((s.len(), s.channels, s.size), (2, 3, 8));
        assert_eq!(s.labels, vec![Some(0), Some(1)]);
        assert_eq!(s.image(1)[2 * 64], 200);
        std::fs::write(dir.path().join("dogs").join("b.png"), b"garbage").unwrap();
        let e = ImageSet::folder(dir.path(), 8).unwrap_err().to_string();
        assert!(e.contains("b.png"), "{e}");
    }

    #[test]
    fn blur_keeps_a_flat_image_flat() {
        let mut img = vec![0.5f32; 3 * 16 * 16];
        blur(&mut img, 3, 16, 1.5);
        assert!(img.iter().all(|&x| (x - 0.5).abs() < 1e-5));
    }
}
