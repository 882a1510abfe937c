/**
 * XWD (the X Window Dump of `xwd -root`) to PNG, for screenshots of a desktop in a container: ZPixmap, 24/32 bits
 * per pixel, true colour (what Xvnc gives at depth 24). Also the picture's colour statistics a test checks.
 */
import * as zlib from "zlib";

export interface Picture {
  width: number;
  height: number;
  /** RGB, 3 bytes a pixel, row by row. */
  rgb: Buffer;
}

export function parseXwd(buf: Buffer): Picture {
  if (buf.length < 100) throw new Error(`xwd: ${buf.length} bytes is no XWD file`);
  const u = (i: number): number => buf.readUInt32BE(i * 4);
  const headerSize = u(0), version = u(1), format = u(2), width = u(4), height = u(5);
  const byteOrder = u(7), bpp = u(11), bytesPerLine = u(12), visualClass = u(13);
  const masks = [u(14), u(15), u(16)];
  const ncolors = u(19);
  if (version !== 7) throw new Error(`xwd: file version ${version}, expected 7`);
  if (format !== 2) throw new Error(`xwd: pixmap format ${format}, expected ZPixmap (2)`);
  if (bpp !== 32 && bpp !== 24) throw new Error(`xwd: ${bpp} bits per pixel (only 24/32 are read)`);
  if (visualClass !== 4 && visualClass !== 5) throw new Error(`xwd: visual class ${visualClass} is not TrueColor/DirectColor`);
  const start = headerSize + ncolors * 12;
  if (buf.length < start + bytesPerLine * height) throw new Error(`xwd: truncated (${buf.length} bytes for ${width}x${height})`);
  const shift = (m: number): number => (m === 0 ? 0 : 31 - Math.clz32(m & -m));
  const shifts = masks.map(shift);
  const rgb = Buffer.alloc(width * height * 3);
  const step = bpp / 8;
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      const o = start + y * bytesPerLine + x * step;
      const px = step === 4 ? (byteOrder === 0 ? buf.readUInt32LE(o) : buf.readUInt32BE(o)) : byteOrder === 0 ? buf.readUIntLE(o, 3) : buf.readUIntBE(o, 3);
      const p = (y * width + x) * 3;
      for (let c = 0; c < 3; c++) rgb[p + c] = ((px & masks[c]) >>> shifts[c]) & 0xff;
    }
  }
  return { width, height, rgb };
}

function chunk(type: string, data: Buffer): Buffer {
  const len = Buffer.alloc(4);
  len.writeUInt32BE(data.length);
  const td = Buffer.concat([Buffer.from(type, "ascii"), data]);
  const crc = Buffer.alloc(4);
  crc.writeUInt32BE(zlib.crc32(td) >>> 0);
  return Buffer.concat([len, td, crc]);
}

export function toPng(p: Picture): Buffer {
  const ihdr = Buffer.alloc(13);
  ihdr.writeUInt32BE(p.width, 0);
  ihdr.writeUInt32BE(p.height, 4);
  ihdr.writeUInt8(8, 8); // bit depth
  ihdr.writeUInt8(2, 9); // colour type RGB
  const raw = Buffer.alloc((p.width * 3 + 1) * p.height);
  for (let y = 0; y < p.height; y++) p.rgb.copy(raw, y * (p.width * 3 + 1) + 1, y * p.width * 3, (y + 1) * p.width * 3);
  return Buffer.concat([
    Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]),
    chunk("IHDR", ihdr),
    chunk("IDAT", zlib.deflateSync(raw)),
    chunk("IEND", Buffer.alloc(0)),
  ]);
}

/** Distinct colours, and the share of pixels that differ from the most common colour (the background). */
export function colourStats(p: Picture): { colours: number; nonBackground: number } {
  const counts = new Map<number, number>();
  for (let i = 0; i < p.rgb.length; i += 3) {
    const c = (p.rgb[i] << 16) | (p.rgb[i + 1] << 8) | p.rgb[i + 2];
    counts.set(c, (counts.get(c) ?? 0) + 1);
  }
  const top = Math.max(...counts.values());
  const total = p.width * p.height;
  return { colours: counts.size, nonBackground: (total - top) / total };
}

/** The picture at 1/`factor` of its size (each output pixel the mean of a factor×factor block): for the docs. */
export function downscale(p: Picture, factor: number): Picture {
  const width = Math.floor(p.width / factor), height = Math.floor(p.height / factor);
  const rgb = Buffer.alloc(width * height * 3);
  for (let y = 0; y < height; y++) {
    for (let x = 0; x < width; x++) {
      for (let c = 0; c < 3; c++) {
        let sum = 0;
        for (let dy = 0; dy < factor; dy++) for (let dx = 0; dx < factor; dx++) sum += p.rgb[((y * factor + dy) * p.width + x * factor + dx) * 3 + c];
        rgb[(y * width + x) * 3 + c] = Math.round(sum / (factor * factor));
      }
    }
  }
  return { width, height, rgb };
}
