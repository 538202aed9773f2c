// WatchoutProducer: a phone (browser or React Native) streaming camera frames to Watchout.
// It needs only the platform's WebSocket. See docs/guide-mobile.md for how to feed it camera frames.
//
//   const producer = new WatchoutProducer({
//     url: "wss://watchout.example.com/ws", streamId: "porch",
//     getToken: async () => (await fetch("/my-app/watchout-token")).text(),  // your backend mints tokens
//     onAlert: (alert) => showNotification(alert),
//     onStopped: (reason) => showMessage(reason),
//   });
//   producer.start();
//   producer.sendFrame(jpegBytes, {width: 640, height: 480});  // a Uint8Array, as often as you have one

const MAX_BUFFERED_BYTES = 512 * 1024;  // more than this not yet sent: skip frames (the newest wins)
const FINAL_CLOSES = {
  4403: "this account may not stream to this stream id",
  4409: "another device took over this stream",
  4410: "the stream was deleted",
  1008: "closed for sending invalid messages",
  1009: "a frame was too big",
};

export class WatchoutProducer {
  constructor({url, streamId, getToken, onAlert = () => {}, onStopped = () => {}, binary = true}) {
    Object.assign(this, {url, streamId, getToken, onAlert, onStopped, binary});
    this.ws = null;
    this.ready = false;
    this.stopped = true;
    this.failures = 0;
    this.timers = {};
  }

  start() {
    this.stopped = false;
    this.connect();
  }

  stop() {
    this.stopped = true;
    Object.values(this.timers).forEach(clearTimeout);
    if (this.ws) this.ws.close(1000);
  }

  async connect() {
    this.token = await this.getToken();
    const ws = this.ws = new WebSocket(this.url);
    ws.binaryType = "arraybuffer";
    ws.onopen = () => ws.send(JSON.stringify({
      type: "register", clientType: "mobile", streamId: this.streamId, id: "register",
      produces: ["video-frame"], consumes: ["alert"], token: this.token}));
    ws.onmessage = (event) => this.onMessage(JSON.parse(event.data));
    ws.onclose = (event) => this.onClose(event);
  }

  onMessage(msg) {
    switch (msg.type) {
      case "registered": this.ready = true; this.failures = 0; this.scheduleRefresh(); break;
      case "alert": this.onAlert(msg); break;  // {severity, message, metadata, seq, alertId, timestamp, ...}
      case "error": console.warn("watchout:", msg.code, msg.message); break;
      // status, authenticated, pong, and types added later: nothing to do
    }
  }

  onClose(event) {
    this.ready = false;
    clearTimeout(this.timers.refresh);
    if (this.stopped) return;
    if (event.code in FINAL_CLOSES) {  // reconnecting would not help, or would take the stream back
      this.stopped = true;
      this.onStopped(FINAL_CLOSES[event.code]);
      return;
    }
    // 1001 (server restart), 1006 (network lost), 4401 (token refused: getToken() runs again), ...
    this.failures += 1;
    const delay = Math.min(30000, 500 * 2 ** this.failures) * (0.5 + Math.random() / 2);
    this.timers.reconnect = setTimeout(() => this.connect(), delay);
  }

  // Send one JPEG (Uint8Array). Returns false when it was skipped: not connected, or the network is
  // behind (a phone should send the newest picture, never a queue of old ones).
  sendFrame(jpeg, {width = 0, height = 0} = {}) {
    if (!this.ready || this.ws.bufferedAmount > MAX_BUFFERED_BYTES) return false;
    const timestamp = Date.now();
    if (this.binary) {
      this.ws.send(binaryFrame(this.streamId, jpeg, timestamp, width, height));
    } else {
      const message = {type: "video-frame", streamId: this.streamId, data: toBase64(jpeg), timestamp};
      if (width && height) Object.assign(message, {width, height});
      this.ws.send(JSON.stringify(message));
    }
    return true;
  }

  // Send `auth` with a fresh token a third of its lifetime (at most a minute) before it expires;
  // the server closes the connection with 4401 shortly after `exp` otherwise.
  scheduleRefresh() {
    const {exp, iat = exp - 3600} = claims(this.token);
    const delay = (exp - Math.min(60, (exp - iat) / 3)) * 1000 - Date.now();
    this.timers.refresh = setTimeout(async () => {
      this.token = await this.getToken();
      if (this.ready) {
        this.ws.send(JSON.stringify({type: "auth", token: this.token, id: "refresh"}));
        this.scheduleRefresh();
      }
    }, Math.max(0, delay));
  }
}

// The binary layout (docs/protocol.md): "WO", version 1, streamId length, timestamp (ms, 64-bit),
// width, height, streamId, JPEG. Big-endian; the timestamp is written as two 32-bit halves.
export function binaryFrame(streamId, jpeg, timestamp, width = 0, height = 0) {
  const id = new TextEncoder().encode(streamId);  // stream ids are ASCII
  const buffer = new ArrayBuffer(16 + id.length + jpeg.length);
  const view = new DataView(buffer);
  view.setUint8(0, 0x57);  // "W"
  view.setUint8(1, 0x4f);  // "O"
  view.setUint8(2, 1);
  view.setUint8(3, id.length);
  view.setUint32(4, Math.floor(timestamp / 2 ** 32));
  view.setUint32(8, timestamp % 2 ** 32);
  view.setUint16(12, width);
  view.setUint16(14, height);
  new Uint8Array(buffer, 16).set(id);
  new Uint8Array(buffer, 16 + id.length).set(jpeg);
  return buffer;
}

function toBase64(bytes) {
  let text = "";
  for (let i = 0; i < bytes.length; i += 0x8000) text += String.fromCharCode(...bytes.subarray(i, i + 0x8000));
  return btoa(text);
}

function claims(jwt) {  // read, not verified: only the server can check a token
  return JSON.parse(atob(jwt.split(".")[1].replace(/-/g, "+").replace(/_/g, "/")));
}
