// CirclesBridge.mqh: the MT5 side of the Circles wire protocol (docs/mt5_protocol.md).
// A small MQTT 3.1.1 client on MQL5 sockets, the deal JSON, the queue file, and
// CirclesMayOpen() for strategy EAs (which may include this file for that alone).
#ifndef CIRCLES_BRIDGE_MQH
#define CIRCLES_BRIDGE_MQH

#define CB_VERSION     "1.0"
#define CB_HALT_GV     "CIRCLES_HALTED"
#define CB_KEEPALIVE_S 60
#define CB_MAX_TICKETS 5000
// Far above any message of the protocol: a bigger length means the stream is out of step.
#define CB_MAX_PACKET  4194304

// MQTT control packet types (the high nibble of the first byte).
#define CB_CONNACK     2
#define CB_PUBLISH     3
#define CB_PUBACK      4
#define CB_SUBACK      9
#define CB_PINGRESP    13

// ------------------------------------------------------------------ strategy EAs
// Call before opening a position. The bridge writes the box's halt into this terminal
// global variable. Without it (no bridge has run in this terminal) nothing is halted; a
// bridge that lost the box keeps the last state it was told, the safe side for a halt.
bool CirclesMayOpen() {
   return !(GlobalVariableCheck(CB_HALT_GV) && GlobalVariableGet(CB_HALT_GV) != 0.0);
}

// ------------------------------------------------------------------ packet test vectors
// The table of docs/mt5_protocol.md, copied. The test suite checks the simulator's encoder
// (appliance/bus/mqtt311.py) against these lines, which keeps the EA and the simulator on
// the same bytes while CI cannot compile MQL5. Keep each VECTOR line exactly as it is.
//
// CONNECT: client circles-ea-demo, user demo, password secret, will circles/mt5/demo/status
// = offline (QoS 1, retained), keep alive 60, clean session.
// VECTOR connect: 10 4b 00 04 4d 51 54 54 04 ee 00 3c 00 0f 63 69 72 63 6c 65 73 2d 65 61 2d 64 65 6d 6f 00 17 63 69 72 63 6c 65 73 2f 6d 74 35 2f 64 65 6d 6f 2f 73 74 61 74 75 73 00 07 6f 66 66 6c 69 6e 65 00 04 64 65 6d 6f 00 06 73 65 63 72 65 74
// PUBLISH QoS 1 on circles/mt5/demo/deal, packet id 1, payload {"ticket":7}.
// VECTOR publish_qos1: 32 25 00 15 63 69 72 63 6c 65 73 2f 6d 74 35 2f 64 65 6d 6f 2f 64 65 61 6c 00 01 7b 22 74 69 63 6b 65 74 22 3a 37 7d
// The same PUBLISH with the DUP flag set.
// VECTOR publish_qos1_dup: 3a 25 00 15 63 69 72 63 6c 65 73 2f 6d 74 35 2f 64 65 6d 6f 2f 64 65 61 6c 00 01 7b 22 74 69 63 6b 65 74 22 3a 37 7d
// PUBLISH QoS 1 retained on circles/mt5/demo/status, packet id 2, payload online.
// VECTOR publish_retained_qos1: 33 21 00 17 63 69 72 63 6c 65 73 2f 6d 74 35 2f 64 65 6d 6f 2f 73 74 61 74 75 73 00 02 6f 6e 6c 69 6e 65
// PUBLISH QoS 0 on circles/mt5/demo/heartbeat, payload {} (QoS 0 has no packet id).
// VECTOR publish_qos0: 30 1e 00 1a 63 69 72 63 6c 65 73 2f 6d 74 35 2f 64 65 6d 6f 2f 68 65 61 72 74 62 65 61 74 7b 7d
// PUBLISH QoS 1 on circles/mt5/demo/deal, packet id 9, 175 times "x": the remaining length
// 200 takes two bytes (c8 01). The first 30 bytes of the packet.
// VECTOR publish_long_head: 32 c8 01 00 15 63 69 72 63 6c 65 73 2f 6d 74 35 2f 64 65 6d 6f 2f 64 65 61 6c 00 09 78 78
// PUBACK for packet id 1.
// VECTOR puback: 40 02 00 01
// SUBSCRIBE, packet id 3: circles/mt5/demo/ack, circles/mt5/demo/cmd/#,
// circles/trading/halt, each QoS 1.
// VECTOR subscribe: 82 49 00 03 00 14 63 69 72 63 6c 65 73 2f 6d 74 35 2f 64 65 6d 6f 2f 61 63 6b 01 00 16 63 69 72 63 6c 65 73 2f 6d 74 35 2f 64 65 6d 6f 2f 63 6d 64 2f 23 01 00 14 63 69 72 63 6c 65 73 2f 74 72 61 64 69 6e 67 2f 68 61 6c 74 01
// PINGREQ.
// VECTOR pingreq: c0 00
// DISCONNECT.
// VECTOR disconnect: e0 00
// CONNACK, read from the broker: no session present, return code 0 (accepted).
// VECTOR connack_accepted: 20 02 00 00
// SUBACK, read from the broker: packet id 3, three QoS 1 grants.
// VECTOR suback: 90 05 00 03 01 01 01
// PINGRESP, read from the broker.
// VECTOR pingresp: d0 00

// ------------------------------------------------------------------ bytes
void CbPutByte(uchar &a[], const int b) {
   int n = ArraySize(a);
   ArrayResize(a, n + 1, 1024);
   a[n] = (uchar)(b & 0xFF);
}

void CbPutU16(uchar &a[], const int v) { CbPutByte(a, v >> 8); CbPutByte(a, v); }

void CbPutBytes(uchar &a[], const uchar &src[]) {
   int n = ArraySize(a), m = ArraySize(src);
   if(m == 0) return;
   ArrayResize(a, n + m, 1024);
   ArrayCopy(a, src, n, 0, m);
}

// UTF-8 bytes of s, without the terminating zero StringToCharArray adds.
int CbUtf8(const string s, uchar &out[]) {
   ArrayResize(out, 0);
   if(s == "") return 0;
   int n = StringToCharArray(s, out, 0, WHOLE_ARRAY, CP_UTF8);
   if(n > 0 && out[n - 1] == 0) n--;
   ArrayResize(out, n);
   return n;
}

// An MQTT string: two-byte big-endian length, then the UTF-8 bytes.
void CbPutString(uchar &a[], const string s) {
   uchar b[];
   CbPutU16(a, CbUtf8(s, b));
   CbPutBytes(a, b);
}

// The remaining length: 7 bits a byte, least significant first, high bit = more follows.
void CbPutLength(uchar &a[], int n) {
   do {
      int digit = n % 128;
      n /= 128;
      if(n > 0) digit |= 0x80;
      CbPutByte(a, digit);
   } while(n > 0);
}

void CbMqttPacket(uchar &pkt[], const int header, const uchar &body[]) {
   ArrayResize(pkt, 0);
   CbPutByte(pkt, header);
   CbPutLength(pkt, ArraySize(body));
   CbPutBytes(pkt, body);
}

// ------------------------------------------------------------------ MQTT 3.1.1 packets
void CbMqttConnect(uchar &pkt[], const string clientId, const string user, const string pass,
                   const string willTopic, const string willMessage, const int willQos,
                   const bool willRetain, const int keepAlive, const bool cleanSession) {
   uchar body[];
   bool withPass = user != "" && pass != "";   // 3.1.1 forbids a password without a user
   CbPutString(body, "MQTT");
   CbPutByte(body, 4);
   int flags = cleanSession ? 0x02 : 0;
   if(willTopic != "") flags |= 0x04 | (willQos << 3) | (willRetain ? 0x20 : 0);
   if(user != "") flags |= 0x80;
   if(withPass) flags |= 0x40;
   CbPutByte(body, flags);
   CbPutU16(body, keepAlive);
   CbPutString(body, clientId);
   if(willTopic != "") { CbPutString(body, willTopic); CbPutString(body, willMessage); }
   if(user != "") CbPutString(body, user);
   if(withPass) CbPutString(body, pass);
   CbMqttPacket(pkt, 0x10, body);
}

void CbMqttPublish(uchar &pkt[], const string topic, const string payload, const int qos,
                   const bool retain, const bool dup, const ushort packetId) {
   uchar body[], data[];
   CbPutString(body, topic);
   if(qos > 0) CbPutU16(body, packetId);
   CbUtf8(payload, data);
   CbPutBytes(body, data);
   CbMqttPacket(pkt, 0x30 | (dup ? 0x08 : 0) | (qos << 1) | (retain ? 0x01 : 0), body);
}

void CbMqttSubscribe(uchar &pkt[], const ushort packetId, const string &topics[], const int qos) {
   uchar body[];
   CbPutU16(body, packetId);
   for(int i = 0; i < ArraySize(topics); i++) {
      CbPutString(body, topics[i]);
      CbPutByte(body, qos);
   }
   CbMqttPacket(pkt, 0x82, body);   // SUBSCRIBE's reserved flags are 0010
}

void CbMqttPuback(uchar &pkt[], const ushort packetId) {
   uchar body[];
   CbPutU16(body, packetId);
   CbMqttPacket(pkt, 0x40, body);
}

void CbMqttPingreq(uchar &pkt[])    { uchar none[]; CbMqttPacket(pkt, 0xC0, none); }
void CbMqttDisconnect(uchar &pkt[]) { uchar none[]; CbMqttPacket(pkt, 0xE0, none); }

// The fixed header at the start of buf: 1 with both lengths when a whole packet is there,
// 0 when more bytes are needed, -1 when it cannot be MQTT.
int CbMqttFrame(const uchar &buf[], int &headerLen, int &bodyLen) {
   int have = ArraySize(buf), multiplier = 1;
   bodyLen = 0;
   for(int i = 1; ; i++) {
      if(i > 4) return -1;   // the remaining length has at most four bytes
      if(i >= have) return 0;
      bodyLen += (buf[i] & 0x7F) * multiplier;
      multiplier *= 128;
      if((buf[i] & 0x80) == 0) { headerLen = i + 1; break; }
   }
   if(bodyLen > CB_MAX_PACKET) return -1;
   return have >= headerLen + bodyLen ? 1 : 0;
}

bool CbMqttReadPublish(const int flags, const uchar &body[], string &topic, string &payload,
                       ushort &packetId) {
   int n = ArraySize(body);
   if(n < 2) return false;
   int topicLen = (body[0] << 8) | body[1];
   int p = 2 + topicLen;
   if(p > n) return false;
   topic = topicLen > 0 ? CharArrayToString(body, 2, topicLen, CP_UTF8) : "";
   packetId = 0;
   if(((flags >> 1) & 3) > 0) {
      if(p + 2 > n) return false;
      packetId = (ushort)((body[p] << 8) | body[p + 1]);
      p += 2;
   }
   payload = p < n ? CharArrayToString(body, p, n - p, CP_UTF8) : "";
   return true;
}

string CbConnackText(const int code) {
   switch(code) {
      case 1: return "unacceptable protocol version";
      case 2: return "client id rejected";
      case 3: return "broker unavailable";
      case 4: return "bad user name or password";
      case 5: return "not authorized";
   }
   return StringFormat("refused (%d)", code);
}

// ------------------------------------------------------------------ the connection
class CbMqtt {
private:
   int    m_sock;
   bool   m_tls;
   uchar  m_rx[];
   ushort m_lastId;
public:
   ulong  lastSent;   // GetTickCount64() of the last packet sent
   ulong  lastRecv;   // ... and of the last bytes received

   CbMqtt() : m_sock(INVALID_HANDLE), m_tls(false), m_lastId(0), lastSent(0), lastRecv(0) {}
   ~CbMqtt() { Close(); }

   // Blocks up to 5 s: the EA runs in its own thread, and nothing can be sent before it.
   bool Open(const string host, const int port, const bool tls, string &err) {
      Close();
      ResetLastError();
      m_sock = SocketCreate();
      if(m_sock == INVALID_HANDLE) { err = StringFormat("SocketCreate failed, error %d", GetLastError()); return false; }
      SocketTimeouts(m_sock, 5000, 5000);
      if(!SocketConnect(m_sock, host, (uint)port, 5000)) {
         int e = GetLastError();
         err = StringFormat("cannot connect to %s:%d, error %d", host, port, e);
         if(e == 4014) err += " (add the host under Tools > Options > Expert Advisors > Allow WebRequest for listed URL)";
         Close();
         return false;
      }
      // MQL5's TLS checks the broker's certificate against the Windows certificate store.
      if(tls && !SocketTlsHandshake(m_sock, host)) {
         err = StringFormat("TLS handshake with %s failed, error %d (is the box's CA imported into Windows?)", host, GetLastError());
         Close();
         return false;
      }
      m_tls = tls;
      lastSent = lastRecv = GetTickCount64();
      return true;
   }

   void Close() {
      if(m_sock != INVALID_HANDLE) SocketClose(m_sock);
      m_sock = INVALID_HANDLE;
      ArrayResize(m_rx, 0);
   }

   ushort NextId() {
      m_lastId = (ushort)(m_lastId == 65535 ? 1 : m_lastId + 1);   // 0 is not a packet id
      return m_lastId;
   }

   // A send may take only part of the buffer: the rest goes in the next call.
   bool Send(const uchar &pkt[]) {
      if(m_sock == INVALID_HANDLE) return false;
      uchar rest[];
      ArrayCopy(rest, pkt);
      while(ArraySize(rest) > 0) {
         int n = m_tls ? SocketTlsSend(m_sock, rest, ArraySize(rest)) : SocketSend(m_sock, rest, ArraySize(rest));
         if(n <= 0) return false;
         ArrayRemove(rest, 0, n);
      }
      lastSent = GetTickCount64();
      return true;
   }

   bool Publish(const string topic, const string payload, const int qos, const bool retain, ushort &id) {
      uchar pkt[];
      id = qos > 0 ? NextId() : 0;
      CbMqttPublish(pkt, topic, payload, qos, retain, false, id);
      return Send(pkt);
   }

   // Moves what has arrived into the receive buffer without waiting; false: connection gone.
   bool Poll() {
      if(m_sock == INVALID_HANDLE || !SocketIsConnected(m_sock)) return false;
      uchar chunk[];
      int got = 0;
      if(m_tls)
         got = SocketTlsReadAvailable(m_sock, chunk, 65536);   // 0 when nothing is there
      else {
         uint avail = SocketIsReadable(m_sock);
         if(avail > 0) got = SocketRead(m_sock, chunk, avail, 100);
      }
      if(got < 0) return false;
      if(got > 0) {
         int n = ArraySize(m_rx);
         ArrayResize(m_rx, n + got, 4096);
         ArrayCopy(m_rx, chunk, n, 0, got);
         lastRecv = GetTickCount64();
      }
      return true;
   }

   // Takes the next whole packet out of the receive buffer: 1, 0 (none yet) or -1 (garbage).
   int Next(int &type, int &flags, uchar &body[]) {
      int headerLen = 0, bodyLen = 0;
      int r = ArraySize(m_rx) < 2 ? 0 : CbMqttFrame(m_rx, headerLen, bodyLen);
      if(r != 1) return r;
      type = m_rx[0] >> 4;
      flags = m_rx[0] & 0x0F;
      ArrayResize(body, bodyLen);
      if(bodyLen > 0) ArrayCopy(body, m_rx, 0, headerLen, bodyLen);
      ArrayRemove(m_rx, 0, headerLen + bodyLen);
      return 1;
   }
};

// ------------------------------------------------------------------ JSON
string CbJsonString(const string s) {
   string out = "\"";
   for(int i = 0; i < StringLen(s); i++) {
      ushort c = StringGetCharacter(s, i);
      if(c == '"') out += "\\\"";
      else if(c == '\\') out += "\\\\";
      else if(c < 0x20) out += StringFormat("\\u%04x", c);
      else out += ShortToString(c);
   }
   return out + "\"";
}

// digits < 0: not known (a balance operation, a symbol gone from the server): eight places
// with the trailing zeros cut, which still writes every value MT5 stores exactly.
string CbNum(const double v, const int digits) {
   if(digits >= 0) return DoubleToString(v, digits);
   string s = DoubleToString(v, 8);
   int n = StringLen(s);
   while(n > 1 && StringGetCharacter(s, n - 1) == '0') n--;
   if(StringGetCharacter(s, n - 1) == '.') n--;
   return StringSubstr(s, 0, n);
}

string CbTicketList(const ulong &tickets[]) {
   string s = "[";
   for(int i = 0; i < ArraySize(tickets); i++)
      s += (i > 0 ? "," : "") + IntegerToString((long)tickets[i]);
   return s + "]";
}

void CbPushTicket(ulong &a[], const ulong t) {
   int n = ArraySize(a);
   ArrayResize(a, n + 1, 256);
   a[n] = t;
}

// The box's documents are small and flat, so a reader that finds "key": is enough. A key
// quoted inside a string value is escaped there (\"key\") and cannot be found by mistake.
int CbJsonValueAt(const string json, const string key, const int from = 0) {
   string needle = "\"" + key + "\"";
   for(int p = StringFind(json, needle, from); p >= 0; p = StringFind(json, needle, p + 1)) {
      int q = p + StringLen(needle);
      while(q < StringLen(json) && StringGetCharacter(json, q) <= ' ') q++;
      if(q < StringLen(json) && StringGetCharacter(json, q) == ':') {
         q++;
         while(q < StringLen(json) && StringGetCharacter(json, q) <= ' ') q++;
         return q;
      }
   }
   return -1;
}

// The index just past the array or object that starts at p.
int CbJsonEnd(const string json, int p) {
   int depth = 0;
   bool inString = false;
   for(; p < StringLen(json); p++) {
      ushort c = StringGetCharacter(json, p);
      if(inString) {
         if(c == '\\') p++;
         else if(c == '"') inString = false;
      }
      else if(c == '"') inString = true;
      else if(c == '[' || c == '{') depth++;
      else if((c == ']' || c == '}') && --depth == 0) return p + 1;
   }
   return p;
}

long CbLongAt(const string s, int p) {
   bool negative = p < StringLen(s) && StringGetCharacter(s, p) == '-';
   if(negative) p++;
   long v = 0;
   for(; p < StringLen(s); p++) {
      ushort c = StringGetCharacter(s, p);
      if(c < '0' || c > '9') break;
      v = v * 10 + (c - '0');
   }
   return negative ? -v : v;
}

bool CbJsonLong(const string json, const string key, long &value) {
   int p = CbJsonValueAt(json, key);
   if(p < 0) return false;
   value = CbLongAt(json, p);
   return true;
}

bool CbJsonBool(const string json, const string key, bool &value) {
   int p = CbJsonValueAt(json, key);
   if(p < 0) return false;
   if(StringSubstr(json, p, 4) == "true") { value = true; return true; }
   if(StringSubstr(json, p, 5) == "false") { value = false; return true; }
   return false;
}

string CbJsonText(const string json, const string key) {
   int p = CbJsonValueAt(json, key);
   string out = "";
   if(p < 0 || StringGetCharacter(json, p) != '"') return out;
   for(int i = p + 1; i < StringLen(json); i++) {
      ushort c = StringGetCharacter(json, i);
      if(c == '"') break;
      if(c == '\\' && i + 1 < StringLen(json)) {
         ushort e = StringGetCharacter(json, ++i);
         c = e == 'n' ? '\n' : e == 't' ? '\t' : e;
         if(e == 'u' && i + 4 < StringLen(json)) {
            c = 0;
            for(int k = 1; k <= 4; k++) {
               ushort h = StringGetCharacter(json, i + k);
               c = (ushort)(c * 16 + (h >= 'a' ? h - 'a' + 10 : h >= 'A' ? h - 'A' + 10 : h - '0'));
            }
            i += 4;
         }
      }
      out += ShortToString(c);
   }
   return out;
}

// The numbers of the flat array under "key" ("accepted", "tickets").
void CbJsonTickets(const string json, const string key, ulong &out[]) {
   ArrayResize(out, 0);
   int p = CbJsonValueAt(json, key);
   if(p < 0 || StringGetCharacter(json, p) != '[') return;
   int end = CbJsonEnd(json, p);
   for(int i = p + 1; i < end; i++) {
      ushort c = StringGetCharacter(json, i);
      if(c < '0' || c > '9') continue;
      CbPushTicket(out, (ulong)CbLongAt(json, i));
      while(i + 1 < end && StringGetCharacter(json, i + 1) >= '0' && StringGetCharacter(json, i + 1) <= '9') i++;
   }
}

// The "ticket" of each object in the ack's "rejected" array.
void CbJsonRejected(const string json, ulong &out[]) {
   ArrayResize(out, 0);
   int p = CbJsonValueAt(json, "rejected");
   if(p < 0 || StringGetCharacter(json, p) != '[') return;
   int end = CbJsonEnd(json, p);
   for(int q = CbJsonValueAt(json, "ticket", p); q >= 0 && q < end; q = CbJsonValueAt(json, "ticket", q))
      CbPushTicket(out, (ulong)CbLongAt(json, q));
}

// ------------------------------------------------------------------ deals
// An enum's name as the protocol writes it: without its prefix, lower case.
string CbEnumName(const string name, const string prefix) {
   string s = name;
   if(StringFind(s, prefix) == 0) s = StringSubstr(s, StringLen(prefix));
   else if(StringFind(s, "DEAL_") == 0) s = StringSubstr(s, 5);   // DEAL_DIVIDEND, DEAL_TAX
   StringToLower(s);
   return s;
}

string CbDealType(const ENUM_DEAL_TYPE t) {
   switch(t) {
      case DEAL_TYPE_BUY:                      return "buy";
      case DEAL_TYPE_SELL:                     return "sell";
      case DEAL_TYPE_BALANCE:                  return "balance";
      case DEAL_TYPE_CREDIT:                   return "credit";
      case DEAL_TYPE_CHARGE:                   return "charge";
      case DEAL_TYPE_CORRECTION:               return "correction";
      case DEAL_TYPE_BONUS:                    return "bonus";
      case DEAL_TYPE_COMMISSION:               return "commission";
      case DEAL_TYPE_COMMISSION_DAILY:         return "commission_daily";
      case DEAL_TYPE_COMMISSION_MONTHLY:       return "commission_monthly";
      case DEAL_TYPE_COMMISSION_AGENT_DAILY:   return "commission_agent_daily";
      case DEAL_TYPE_COMMISSION_AGENT_MONTHLY: return "commission_agent_monthly";
      case DEAL_TYPE_INTEREST:                 return "interest";
      case DEAL_TYPE_BUY_CANCELED:             return "buy_canceled";
      case DEAL_TYPE_SELL_CANCELED:            return "sell_canceled";
   }
   return CbEnumName(EnumToString(t), "DEAL_TYPE_");   // dividend, tax, types added later
}

string CbDealEntry(const ENUM_DEAL_ENTRY e) {
   switch(e) {
      case DEAL_ENTRY_IN:     return "in";
      case DEAL_ENTRY_OUT:    return "out";
      case DEAL_ENTRY_INOUT:  return "inout";
      case DEAL_ENTRY_OUT_BY: return "out_by";
   }
   return CbEnumName(EnumToString(e), "DEAL_ENTRY_");
}

string CbDealReason(const ENUM_DEAL_REASON r) {
   switch(r) {
      case DEAL_REASON_CLIENT:   return "client";
      case DEAL_REASON_MOBILE:   return "mobile";
      case DEAL_REASON_WEB:      return "web";
      case DEAL_REASON_EXPERT:   return "expert";
      case DEAL_REASON_SL:       return "sl";
      case DEAL_REASON_TP:       return "tp";
      case DEAL_REASON_SO:       return "so";
      case DEAL_REASON_ROLLOVER: return "rollover";
      case DEAL_REASON_VMARGIN:  return "vmargin";
      case DEAL_REASON_SPLIT:    return "split";
   }
   return CbEnumName(EnumToString(r), "DEAL_REASON_");
}

// TimeTradeServer() - TimeGMT(). The terminal estimates both and they are read a moment
// apart, so the difference is rounded to the quarter hour every real offset is made of.
long CbGmtOffset() {
   long raw = (long)TimeTradeServer() - (long)TimeGMT();
   return (long)MathRound(raw / 900.0) * 900;
}

string CbIsoUtc(const datetime t) {
   MqlDateTime d;
   TimeToStruct(t, d);
   return StringFormat("%04d-%02d-%02dT%02d:%02d:%02dZ", d.year, d.mon, d.day, d.hour, d.min, d.sec);
}

int CbVolumeDigits(const string symbol) {
   double step = 0;
   if(symbol == "" || !SymbolInfoDouble(symbol, SYMBOL_VOLUME_STEP, step) || step <= 0) return -1;
   int d = 0;
   for(; d < 8 && MathAbs(step - MathRound(step)) > 1e-9; d++) step *= 10;
   return d;
}

// The deal as one JSON line: the keys of the protocol's table, in its order. Prices with
// the symbol's digits, lots with the volume step's, money with the account currency's.
// The deal must be selected (HistoryDealSelect) first.
string CbDealJson(const ulong ticket) {
   string symbol = HistoryDealGetString(ticket, DEAL_SYMBOL);
   long priceDigits = -1;
   if(symbol == "" || !SymbolInfoInteger(symbol, SYMBOL_DIGITS, priceDigits)) priceDigits = -1;
   int money = (int)AccountInfoInteger(ACCOUNT_CURRENCY_DIGITS);
   return "{\"ticket\":" + IntegerToString((long)ticket)
      + ",\"order\":" + IntegerToString(HistoryDealGetInteger(ticket, DEAL_ORDER))
      + ",\"position\":" + IntegerToString(HistoryDealGetInteger(ticket, DEAL_POSITION_ID))
      + ",\"symbol\":" + CbJsonString(symbol)
      + ",\"type\":\"" + CbDealType((ENUM_DEAL_TYPE)HistoryDealGetInteger(ticket, DEAL_TYPE)) + "\""
      + ",\"entry\":\"" + CbDealEntry((ENUM_DEAL_ENTRY)HistoryDealGetInteger(ticket, DEAL_ENTRY)) + "\""
      + ",\"volume\":" + CbNum(HistoryDealGetDouble(ticket, DEAL_VOLUME), CbVolumeDigits(symbol))
      + ",\"price\":" + CbNum(HistoryDealGetDouble(ticket, DEAL_PRICE), (int)priceDigits)
      + ",\"profit\":" + CbNum(HistoryDealGetDouble(ticket, DEAL_PROFIT), money)
      + ",\"commission\":" + CbNum(HistoryDealGetDouble(ticket, DEAL_COMMISSION), money)
      + ",\"swap\":" + CbNum(HistoryDealGetDouble(ticket, DEAL_SWAP), money)
      + ",\"fee\":" + CbNum(HistoryDealGetDouble(ticket, DEAL_FEE), money)
      + ",\"magic\":" + IntegerToString(HistoryDealGetInteger(ticket, DEAL_MAGIC))
      + ",\"reason\":\"" + CbDealReason((ENUM_DEAL_REASON)HistoryDealGetInteger(ticket, DEAL_REASON)) + "\""
      + ",\"time_msc\":" + IntegerToString(HistoryDealGetInteger(ticket, DEAL_TIME_MSC))
      + ",\"gmt_offset_s\":" + IntegerToString(CbGmtOffset())
      + ",\"currency\":" + CbJsonString(AccountInfoString(ACCOUNT_CURRENCY))
      + ",\"comment\":" + CbJsonString(HistoryDealGetString(ticket, DEAL_COMMENT))
      + ",\"login\":" + IntegerToString(AccountInfoInteger(ACCOUNT_LOGIN))
      + "}";
}

// ------------------------------------------------------------------ the queue file
// MQL5/Files/circles/<account>.queue: one deal JSON line each, until the ledger acks it.
struct CbQueued {
   ulong  ticket;
   string json;
   ulong  sentAt;     // GetTickCount64() of the last publish; 0: due now
   ushort packetId;   // of the last publish
   bool   brokerHas;  // its PUBACK came (the ledger may still not have it)
   int    tries;      // re-sends so far: each waits twice as long (a box down for hours
                      // must not fill the broker's queues with copies)
};

int CbQueueFind(const CbQueued &q[], const ulong ticket) {
   for(int i = 0; i < ArraySize(q); i++)
      if(q[i].ticket == ticket) return i;
   return -1;
}

void CbQueuePush(CbQueued &q[], const ulong ticket, const string json) {
   int n = ArraySize(q);
   ArrayResize(q, n + 1, 64);
   q[n].ticket = ticket;
   q[n].json = json;
   q[n].sentAt = 0;
   q[n].packetId = 0;
   q[n].brokerHas = false;
   q[n].tries = 0;
}

void CbQueueLoad(const string path, CbQueued &q[]) {
   ArrayResize(q, 0);
   if(!FileIsExist(path)) return;
   int h = FileOpen(path, FILE_READ | FILE_TXT | FILE_ANSI | FILE_SHARE_READ, 0, CP_UTF8);
   if(h == INVALID_HANDLE) { PrintFormat("Circles bridge: cannot read %s, error %d", path, GetLastError()); return; }
   while(!FileIsEnding(h)) {
      string line = FileReadString(h);
      long ticket = 0;
      if(line == "") continue;
      if(!CbJsonLong(line, "ticket", ticket) || ticket <= 0)
         PrintFormat("Circles bridge: skipping a line of %s without a ticket: %s", path, line);
      else if(CbQueueFind(q, (ulong)ticket) < 0)
         CbQueuePush(q, (ulong)ticket, line);
   }
   FileClose(h);
}

bool CbQueueAppend(const string path, const string json) {
   int h = FileOpen(path, FILE_READ | FILE_WRITE | FILE_TXT | FILE_ANSI | FILE_SHARE_READ, 0, CP_UTF8);
   if(h == INVALID_HANDLE) return false;
   FileSeek(h, 0, SEEK_END);
   bool ok = FileWriteString(h, json + "\r\n") > 0;
   FileClose(h);
   return ok;
}

// Written whole under another name, then moved over the old file: a crash leaves the old
// queue or the new one, never half of one.
bool CbQueueSave(const string path, const CbQueued &q[]) {
   string tmp = path + ".tmp";
   int h = FileOpen(tmp, FILE_WRITE | FILE_TXT | FILE_ANSI, 0, CP_UTF8);
   if(h == INVALID_HANDLE) return false;
   bool ok = true;
   for(int i = 0; i < ArraySize(q) && ok; i++)
      ok = FileWriteString(h, q[i].json + "\r\n") > 0;
   FileClose(h);
   return ok && FileMove(tmp, 0, path, FILE_REWRITE);
}

#endif
