/**
 * A small Guacamole protocol client (the text protocol guacd speaks on 4822): enough to ask guacd for a VNC
 * connection and read back the first frame, so a test can prove that guacd reaches a desktop and sees its pixels.
 *
 * The protocol: every instruction is `LENGTH.VALUE,LENGTH.VALUE,...;`, the first element being the opcode, each
 * LENGTH the number of Unicode code points of VALUE. The handshake: the client sends `select` with the protocol,
 * guacd answers `args` (the names of the connection parameters; since 1.1.0 the first one is the protocol version,
 * e.g. `VERSION_1_3_0`), the client sends `size`, `audio`, `video`, `image`, then `connect` with one value per
 * name of `args`, and guacd answers `ready` with the connection id. Then the display: `size` of layer 0, images
 * (`img` opening a stream with a mimetype, `blob`s of base64 data, `end`), and `sync` closing a frame, which the
 * client acknowledges with its own `sync`. `error` (message, status code) reports a failure; `nop` keeps alive.
 */
import * as net from "net";
import * as zlib from "zlib";

/** One instruction: opcode and arguments. */
export interface Instruction {
  opcode: string;
  args: string[];
}

/** Encode one instruction (`length` counts code points, as the protocol requires). */
export function encodeInstruction(opcode: string, ...args: string[]): string {
  return [opcode, ...args].map((v) => `${[...v].length}.${v}`).join(",") + ";";
}

/**
 * Incremental parser: feed it text as it arrives, it returns every complete instruction. Throws on malformed input
 * (a length that is not a number, an element not followed by `,` or `;`).
 */
export class InstructionParser {
  private buf = "";
  private pos = 0;
  private elements: string[] = [];

  push(text: string): Instruction[] {
    this.buf = this.buf.slice(this.pos) + text;
    this.pos = 0;
    const out: Instruction[] = [];
    for (;;) {
      const dot = this.buf.indexOf(".", this.pos);
      if (dot < 0) break;
      const lenText = this.buf.slice(this.pos, dot);
      if (!/^\d+$/.test(lenText)) throw new Error(`guacamole protocol: bad element length ${JSON.stringify(lenText.slice(0, 40))}`);
      const len = Number(lenText);
      // LENGTH counts code points: walk them (a surrogate pair is one code point, two UTF-16 units)
      let end = dot + 1;
      let fast = this.buf.slice(end, end + len);
      if (!/[\uD800-\uDBFF]/.test(fast)) end += len;
      else {
        let n = 0;
        while (n < len && end < this.buf.length) {
          const c = this.buf.charCodeAt(end);
          end += c >= 0xd800 && c <= 0xdbff ? 2 : 1;
          n++;
        }
        fast = this.buf.slice(dot + 1, end);
      }
      if (end >= this.buf.length) break; // the value or its terminator has not arrived yet
      const term = this.buf[end];
      if (term !== "," && term !== ";") throw new Error(`guacamole protocol: element of length ${len} followed by ${JSON.stringify(term)}`);
      this.elements.push(fast);
      this.pos = end + 1;
      if (term === ";") {
        const [opcode, ...args] = this.elements;
        out.push({ opcode, args });
        this.elements = [];
      }
    }
    return out;
  }
}

/** What a PNG holds: its size and, decoded, RGBA pixels (row-major). */
export interface PngImage {
  width: number;
  height: number;
  colorType: number;
  rgba: Buffer;
}

/** Samples per pixel of each PNG colour type (0 grey, 2 RGB, 3 palette index, 4 grey+alpha, 6 RGBA). */
const PNG_CHANNELS: Record<number, number> = { 0: 1, 2: 3, 3: 1, 4: 2, 6: 4 };

/**
 * Decode a non-interlaced PNG of any colour type at bit depth 8, or of a palette/grey image at 1, 2, 4 or 8 bits
 * (guacd's libguac writes palette PNGs for images of few colours, RGB(A) otherwise). Throws on anything else.
 */
export function decodePng(png: Buffer): PngImage {
  const SIG = Buffer.from([0x89, 0x50, 0x4e, 0x47, 0x0d, 0x0a, 0x1a, 0x0a]);
  if (png.length < 33 || !png.subarray(0, 8).equals(SIG)) throw new Error("not a PNG (signature)");
  let off = 8;
  let width = 0, height = 0, bitDepth = 0, colorType = -1, interlace = 0;
  let palette = Buffer.alloc(0);
  let trns = Buffer.alloc(0);
  const idat: Buffer[] = [];
  let ended = false;
  while (off + 8 <= png.length) {
    const len = png.readUInt32BE(off);
    const type = png.toString("latin1", off + 4, off + 8);
    const data = png.subarray(off + 8, off + 8 + len);
    if (data.length !== len) throw new Error(`PNG chunk ${type} truncated`);
    if (type === "IHDR") {
      width = data.readUInt32BE(0);
      height = data.readUInt32BE(4);
      bitDepth = data[8];
      colorType = data[9];
      interlace = data[12];
    } else if (type === "PLTE") palette = Buffer.from(data);
    else if (type === "tRNS") trns = Buffer.from(data);
    else if (type === "IDAT") idat.push(data);
    else if (type === "IEND") {
      ended = true;
      break;
    }
    off += 12 + len;
  }
  if (!ended) throw new Error("PNG has no IEND");
  const channels = PNG_CHANNELS[colorType];
  const depthOk = bitDepth === 8 || ((colorType === 0 || colorType === 3) && [1, 2, 4].includes(bitDepth));
  if (channels === undefined || !depthOk || interlace !== 0) throw new Error(`PNG kind not handled: depth ${bitDepth}, colour type ${colorType}, interlace ${interlace}`);
  if (colorType === 3 && palette.length === 0) throw new Error("palette PNG without PLTE");
  const bitsPerPixel = channels * bitDepth;
  const bpp = Math.max(1, bitsPerPixel >> 3); // the filters' byte distance
  const stride = Math.ceil((width * bitsPerPixel) / 8);
  const raw = zlib.inflateSync(Buffer.concat(idat));
  if (raw.length !== height * (stride + 1)) throw new Error(`PNG data is ${raw.length} bytes, expected ${height * (stride + 1)}`);
  const cur = Buffer.alloc(stride);
  const prev = Buffer.alloc(stride);
  const rgba = Buffer.alloc(width * height * 4);
  const sample = (x: number, ch: number): number => {
    if (bitDepth === 8) return cur[x * channels + ch];
    const bit = x * bitDepth; // channels = 1 here
    return (cur[bit >> 3] >> (8 - bitDepth - (bit & 7))) & ((1 << bitDepth) - 1);
  };
  for (let y = 0; y < height; y++) {
    const f = raw[y * (stride + 1)];
    const line = raw.subarray(y * (stride + 1) + 1, (y + 1) * (stride + 1));
    for (let i = 0; i < stride; i++) {
      const a = i >= bpp ? cur[i - bpp] : 0;
      const b = prev[i];
      const c = i >= bpp ? prev[i - bpp] : 0;
      let v = line[i];
      if (f === 1) v += a;
      else if (f === 2) v += b;
      else if (f === 3) v += (a + b) >> 1;
      else if (f === 4) {
        const p = a + b - c;
        const pa = Math.abs(p - a), pb = Math.abs(p - b), pc = Math.abs(p - c);
        v += pa <= pb && pa <= pc ? a : pb <= pc ? b : c;
      } else if (f !== 0) throw new Error(`PNG filter ${f} on row ${y}`);
      cur[i] = v & 0xff;
    }
    for (let x = 0; x < width; x++) {
      const o = (y * width + x) * 4;
      if (colorType === 3) {
        const idx = sample(x, 0);
        if (idx * 3 + 2 >= palette.length) throw new Error(`palette index ${idx} outside PLTE`);
        rgba[o] = palette[idx * 3];
        rgba[o + 1] = palette[idx * 3 + 1];
        rgba[o + 2] = palette[idx * 3 + 2];
        rgba[o + 3] = idx < trns.length ? trns[idx] : 255;
      } else if (colorType === 0 || colorType === 4) {
        const g = bitDepth === 8 ? sample(x, 0) : Math.round((sample(x, 0) * 255) / ((1 << bitDepth) - 1));
        rgba[o] = rgba[o + 1] = rgba[o + 2] = g;
        rgba[o + 3] = colorType === 4 ? sample(x, 1) : 255;
      } else {
        rgba[o] = sample(x, 0);
        rgba[o + 1] = sample(x, 1);
        rgba[o + 2] = sample(x, 2);
        rgba[o + 3] = colorType === 6 ? sample(x, 3) : 255;
      }
    }
    cur.copy(prev);
  }
  return { width, height, colorType, rgba };
}

/** One image of a frame: where guacd drew it and the decoded PNG. */
export interface FrameImage {
  layer: number;
  x: number;
  y: number;
  mimetype: string;
  bytes: number;
  png?: PngImage;
  /** Why the PNG did not decode (the test fails on it; the session goes on). */
  decodeError?: string;
}

export interface GuacFrameOptions {
  /** guacd's address. */
  host: string;
  port: number;
  /** The VNC server as guacd sees it (on guacd's network). */
  vncHost: string;
  vncPort: number;
  password: string;
  /** Give up after this long (default 30 s). */
  timeoutMs?: number;
  /** The client's display size sent in `size` (VNC keeps the server's own size). */
  width?: number;
  height?: number;
}

export interface GuacFrameResult {
  /** guacd's protocol version (first element of `args`, e.g. VERSION_1_3_0), or "" for a pre-1.1 guacd. */
  version: string;
  /** The parameter names guacd asked for. */
  argNames: string[];
  /** The connection id of `ready`, when guacd got that far. */
  connectionId?: string;
  /** Size of the default layer (guacd's `size` of layer 0): the remote desktop's size. */
  screen?: { width: number; height: number };
  /** Every image up to the `sync` of the first frame that drew on the default layer (layer 0), buffers included. */
  images: FrameImage[];
  /** ms from connecting to guacd to that frame's `sync`. */
  msToFirstFrame?: number;
  /** `error` instructions received: message and status code. */
  errors: Array<{ message: string; status: string }>;
  /** How the session ended: first frame read, guacd closed, timed out. */
  ended: "frame" | "closed" | "timeout";
}

function decodeInto(img: FrameImage, data: Buffer): void {
  try {
    img.png = decodePng(data);
  } catch (e) {
    img.decodeError = (e as Error).message;
  }
}

/** The value guacd gets for each name of `args` (the version is echoed; unknown names stay empty). */
function connectValues(argNames: string[], version: string, o: GuacFrameOptions): string[] {
  const known: Record<string, string> = { hostname: o.vncHost, port: String(o.vncPort), password: o.password, "color-depth": "24" };
  return argNames.map((name, i) => (i === 0 && version ? version : known[name] ?? ""));
}

/**
 * Connect to guacd, ask for a VNC connection to vncHost:vncPort with `password`, and read until the first frame
 * that draws an image (its `sync`), an error and close, or the timeout. Never throws for a refused connection: the
 * result says what happened (the test asserts on it).
 */
export function guacFrame(o: GuacFrameOptions): Promise<GuacFrameResult> {
  const timeoutMs = o.timeoutMs ?? 30_000;
  return new Promise((resolve, reject) => {
    const started = Date.now();
    const res: GuacFrameResult = { version: "", argNames: [], images: [], errors: [], ended: "timeout" };
    const parser = new InstructionParser();
    const streams = new Map<string, { img: FrameImage; chunks: string[] }>();
    let done = false;
    const sock = net.connect({ host: o.host, port: o.port });
    sock.setEncoding("utf8");
    const finish = (how: GuacFrameResult["ended"]): void => {
      if (done) return;
      done = true;
      res.ended = how;
      clearTimeout(timer);
      try {
        sock.write(encodeInstruction("disconnect"));
      } catch {
        /* already closed */
      }
      sock.destroy();
      resolve(res);
    };
    const timer = setTimeout(() => finish("timeout"), timeoutMs);
    sock.on("connect", () => sock.write(encodeInstruction("select", "vnc")));
    sock.on("error", (e) => {
      if (done) return;
      if (res.argNames.length === 0 && !res.errors.length) {
        done = true;
        clearTimeout(timer);
        reject(new Error(`guacd at ${o.host}:${o.port}: ${e.message}`));
      } else finish("closed");
    });
    sock.on("close", () => finish("closed"));
    sock.on("data", (text: string) => {
      let list: Instruction[];
      try {
        list = parser.push(text);
      } catch (e) {
        done = true;
        clearTimeout(timer);
        sock.destroy();
        reject(e);
        return;
      }
      for (const ins of list) {
        if (done) return;
        const a = ins.args;
        switch (ins.opcode) {
          case "args": {
            res.version = /^VERSION_\d+_\d+_\d+$/.test(a[0] ?? "") ? a[0] : "";
            res.argNames = a;
            const w = String(o.width ?? 1024), h = String(o.height ?? 768);
            sock.write(
              encodeInstruction("size", w, h, "96") +
                encodeInstruction("audio") +
                encodeInstruction("video") +
                encodeInstruction("image", "image/png") +
                encodeInstruction("connect", ...connectValues(a, res.version, o)),
            );
            break;
          }
          case "ready":
            res.connectionId = a[0];
            break;
          case "size":
            if (a[0] === "0" && a.length >= 3) res.screen = { width: Number(a[1]), height: Number(a[2]) };
            break;
          case "img": // stream, mask, layer, mimetype, x, y
            streams.set(a[0], { img: { layer: Number(a[2]), mimetype: a[3], x: Number(a[4]), y: Number(a[5]), bytes: 0 }, chunks: [] });
            sock.write(encodeInstruction("ack", a[0], "OK", "0"));
            break;
          case "png": { // pre-0.9 form: mask, layer, x, y, base64 data
            const data = Buffer.from(a[4] ?? "", "base64");
            const img: FrameImage = { layer: Number(a[1]), x: Number(a[2]), y: Number(a[3]), mimetype: "image/png", bytes: data.length };
            decodeInto(img, data);
            res.images.push(img);
            break;
          }
          case "blob": {
            const s = streams.get(a[0]);
            if (s) s.chunks.push(a[1] ?? "");
            sock.write(encodeInstruction("ack", a[0], "OK", "0"));
            break;
          }
          case "end": {
            const s = streams.get(a[0]);
            if (!s) break;
            streams.delete(a[0]);
            const data = Buffer.from(s.chunks.join(""), "base64");
            s.img.bytes = data.length;
            if (s.img.mimetype === "image/png") decodeInto(s.img, data);
            res.images.push(s.img);
            break;
          }
          case "sync":
            sock.write(encodeInstruction("sync", a[0]));
            // a frame of the desktop: an image drawn on the default layer (0); negative layers are off-screen
            // buffers (the cursor's, for one), which guacd fills first
            if (res.images.some((i) => i.layer === 0)) {
              res.msToFirstFrame = Date.now() - started;
              finish("frame");
            }
            break;
          case "nop":
            sock.write(encodeInstruction("nop"));
            break;
          case "error":
            res.errors.push({ message: a[0] ?? "", status: a[1] ?? "" });
            break;
          case "disconnect":
            finish("closed");
            break;
          default:
            break;
        }
      }
    });
  });
}

/** The RGBA pixel of a frame at screen position (x, y), from the image that covers it (last drawn wins). */
export function framePixel(images: FrameImage[], x: number, y: number): [number, number, number, number] | undefined {
  for (let i = images.length - 1; i >= 0; i--) {
    const im = images[i];
    if (im.layer !== 0 || !im.png) continue;
    const px = x - im.x, py = y - im.y;
    if (px < 0 || py < 0 || px >= im.png.width || py >= im.png.height) continue;
    const o = (py * im.png.width + px) * 4;
    const r = im.png.rgba;
    return [r[o], r[o + 1], r[o + 2], r[o + 3]];
  }
  return undefined;
}
