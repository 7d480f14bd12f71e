// CirclesBridge.mq5: sends every deal of this account to the Circles box over MQTT, keeps
// it in a queue file until the box's ledger confirms it, and obeys the box's trading halt.
// The wire protocol is docs/mt5_protocol.md; the README next to this file installs it.
#property copyright   "Circles"
#property version     "1.00"
#property description "Sends this account's deals to the Circles box and obeys its trading halt."

#include <Trade\Trade.mqh>
#include "CirclesBridge.mqh"

input string InpHost            = "";           // Box address (from the .set of circles device add)
input int    InpPort            = 1883;         // Broker port: 1883 plain, 8883 TLS
input bool   InpTls             = false;        // TLS (the box's CA imported into Windows)
input string InpUsername        = "";           // Broker user name
input string InpPassword        = "";           // Broker password
input string InpAccount         = "";           // Account label: the device name
input string InpMagics          = "1001,1002";  // Magic numbers of the strategies it manages
input int    InpSnapshotMinutes = 15;           // Snapshot of recent history every N minutes
input int    InpSnapshotDays    = 7;            // Days of history in a snapshot

#define RESEND_MS        ((ulong)10000)
#define RESEND_MAX_MS    ((ulong)300000)
#define HEARTBEAT_MS     ((ulong)30000)
#define PING_IDLE_MS     ((ulong)30000)
#define PING_TIMEOUT_MS  ((ulong)30000)
#define CONNACK_MS       ((ulong)10000)
#define BACKOFF_MIN_MS   ((ulong)1000)
#define BACKOFF_MAX_MS   ((ulong)60000)
#define SELECT_RETRY_MS  ((ulong)60000)
// A long queue after an outage goes out at 200 deals a second rather than in one burst
// that would block the EA while the socket's buffer drains.
#define PUBLISH_PER_TICK 50

enum LinkState { LINK_OFFLINE, LINK_CONNECTING, LINK_ONLINE };

CbMqtt    g_mqtt;
LinkState g_state = LINK_OFFLINE;
CTrade    g_trade;
CbQueued  g_queue[];
string    g_queuePath;
string    g_tDeal, g_tSnapshot, g_tHeartbeat, g_tStatus, g_tAck, g_tCmd, g_tHalt;
long      g_magics[];
ulong     g_backoff = BACKOFF_MIN_MS, g_nextAttempt = 0, g_connectSentAt = 0, g_pingSentAt = 0;
ulong     g_lastHeartbeat = 0, g_lastSnapshot = 0;
string    g_lastError = "";
bool      g_halted = false;
string    g_haltBy = "", g_haltReason = "";
ulong     g_unselected[], g_unselectedSince[];   // deals the history did not show yet
string    g_chart = "";

// ------------------------------------------------------------------ events
int OnInit() {
   if(MQLInfoInteger(MQL_TESTER)) {
      Print("Circles bridge: sockets do not work in the strategy tester; attach it to a chart");
      return INIT_FAILED;
   }
   if(!ValidAccount(InpAccount) || InpHost == "" || InpUsername == "" || InpPort <= 0 || InpPort > 65535) {
      Print("Circles bridge: load the inputs from the .set file of `circles device add NAME --kind mt5`"
            " (InpAccount: 1-63 of a-z 0-9 - _; InpHost, InpPort and InpUsername set)");
      return INIT_PARAMETERS_INCORRECT;
   }
   if(!ParseMagics(InpMagics)) {
      Print("Circles bridge: InpMagics must be whole numbers separated by commas, e.g. 1001,1002");
      return INIT_PARAMETERS_INCORRECT;
   }
   string base = "circles/mt5/" + InpAccount + "/";
   g_tDeal = base + "deal";
   g_tSnapshot = base + "snapshot";
   g_tHeartbeat = base + "heartbeat";
   g_tStatus = base + "status";
   g_tAck = base + "ack";
   g_tCmd = base + "cmd/";
   g_tHalt = "circles/trading/halt";

   FolderCreate("circles");
   g_queuePath = "circles\\" + InpAccount + ".queue";
   CbQueueLoad(g_queuePath, g_queue);
   PrintFormat("Circles bridge %s for %s: %d deal(s) waiting in MQL5\\Files\\%s", CB_VERSION, InpAccount,
               ArraySize(g_queue), g_queuePath);
   // Until the box says otherwise, the last halt this terminal was told stays in force.
   g_halted = !CirclesMayOpen();
   EventSetMillisecondTimer(250);
   ShowChart();
   return INIT_SUCCEEDED;
}

void OnDeinit(const int reason) {
   EventKillTimer();
   // A clean stop says offline itself and then DISCONNECTs, so the broker drops the will.
   if(g_state == LINK_ONLINE) {
      ushort id;
      uchar pkt[];
      g_mqtt.Publish(g_tStatus, "offline", 1, true, id);
      CbMqttDisconnect(pkt);
      g_mqtt.Send(pkt);
   }
   g_mqtt.Close();
   g_state = LINK_OFFLINE;
   Comment("");
}

void OnTimer() {
   if(g_state == LINK_OFFLINE) {
      if(GetTickCount64() >= g_nextAttempt) Connect();
   }
   else ReadPackets();

   ulong now = GetTickCount64();
   if(g_state == LINK_CONNECTING && now - g_connectSentAt > CONNACK_MS) Drop("no CONNACK from the broker");
   if(g_state == LINK_ONLINE) PublishDue(now);
   if(g_state == LINK_ONLINE && now - g_lastHeartbeat >= HEARTBEAT_MS) SendHeartbeat(now);
   if(g_state == LINK_ONLINE && InpSnapshotMinutes > 0 && now - g_lastSnapshot >= (ulong)InpSnapshotMinutes * 60000)
      SendSnapshot(now);
   if(g_state == LINK_ONLINE) KeepAlive(now);
   RetryUnselected(now);
   ShowChart();
}

void OnTradeTransaction(const MqlTradeTransaction &trans, const MqlTradeRequest &request,
                        const MqlTradeResult &result) {
   if(trans.type != TRADE_TRANSACTION_DEAL_ADD || trans.deal == 0) return;
   if(!AddDeal(trans.deal, true)) {
      int n = ArraySize(g_unselected);
      ArrayResize(g_unselected, n + 1);
      ArrayResize(g_unselectedSince, n + 1);
      g_unselected[n] = trans.deal;
      g_unselectedSince[n] = GetTickCount64();
      return;
   }
   if(g_state == LINK_ONLINE) PublishDue(GetTickCount64());
   ShowChart();
}

// ------------------------------------------------------------------ deals and the queue
// Puts the deal in the queue, on disk first; one already waiting is only made due again.
// `live`: it has just happened, so the halt applies to it (a re-send is history).
bool AddDeal(const ulong ticket, const bool live) {
   if(!HistoryDealSelect(ticket)) return false;
   int i = CbQueueFind(g_queue, ticket);
   if(i >= 0) { g_queue[i].sentAt = 0; g_queue[i].tries = 0; }
   else {
      string json = CbDealJson(ticket);
      if(!CbQueueAppend(g_queuePath, json))
         PrintFormat("Circles bridge: cannot append deal %I64u to %s, error %d (kept in memory)",
                     ticket, g_queuePath, GetLastError());
      CbQueuePush(g_queue, ticket, json);
   }
   if(live) EnforceHalt(ticket);
   return true;
}

// DEAL_ADD may come a moment before the deal is in the terminal's history.
void RetryUnselected(const ulong now) {
   for(int i = ArraySize(g_unselected) - 1; i >= 0; i--) {
      bool found = AddDeal(g_unselected[i], true);
      if(!found && now - g_unselectedSince[i] < SELECT_RETRY_MS) continue;
      if(!found) PrintFormat("Circles bridge: deal %I64u is not in the history; the next snapshot shows it", g_unselected[i]);
      ArrayRemove(g_unselected, i, 1);
      ArrayRemove(g_unselectedSince, i, 1);
   }
}

// Publishes what is due: new deals, and those the ledger has not confirmed within 10 s,
// then 20, 40… up to 5 minutes (with a new packet id: the ledger stores a deal once however
// often it comes).
void PublishDue(const ulong now) {
   int sent = 0;
   for(int i = 0; i < ArraySize(g_queue) && sent < PUBLISH_PER_TICK; i++) {
      ulong wait = MathMin(RESEND_MS << MathMin(g_queue[i].tries, 5), RESEND_MAX_MS);
      if(g_queue[i].sentAt != 0 && now - g_queue[i].sentAt < wait) continue;
      if(g_queue[i].sentAt != 0) g_queue[i].tries++;
      ushort id;
      if(!g_mqtt.Publish(g_tDeal, g_queue[i].json, 1, false, id)) { Drop("sending a deal failed"); return; }
      g_queue[i].sentAt = now;
      g_queue[i].packetId = id;
      g_queue[i].brokerHas = false;
      sent++;
   }
}

// Accepted and rejected deals both leave the queue: a rejected one would never be accepted
// as it is, and the box keeps it on its dead-letter topic.
void OnAck(const string payload) {
   ulong accepted[], rejected[];
   CbJsonTickets(payload, "accepted", accepted);
   CbJsonRejected(payload, rejected);
   if(ArraySize(rejected) > 0)
      Print("Circles bridge: the ledger refused deal(s), see circles/dlq/mt5-bridge: ", payload);
   int kept = 0;
   for(int i = 0; i < ArraySize(g_queue); i++) {
      if(Contains(accepted, g_queue[i].ticket) || Contains(rejected, g_queue[i].ticket)) continue;
      if(kept != i) g_queue[kept] = g_queue[i];   // by hand: ArrayRemove and structs with strings
      kept++;
   }
   int removed = ArraySize(g_queue) - kept;
   ArrayResize(g_queue, kept);
   if(removed > 0 && !CbQueueSave(g_queuePath, g_queue))
      PrintFormat("Circles bridge: cannot rewrite %s, error %d (confirmed deals may be sent again)",
                  g_queuePath, GetLastError());
}

bool Contains(const ulong &a[], const ulong v) {
   for(int i = 0; i < ArraySize(a); i++)
      if(a[i] == v) return true;
   return false;
}

void OnCommand(const string name, const string payload) {
   if(name != "resend") { PrintFormat("Circles bridge: unknown command %s", name); return; }
   ulong tickets[];
   CbJsonTickets(payload, "tickets", tickets);
   int missing = 0;
   for(int i = 0; i < ArraySize(tickets); i++)
      if(!AddDeal(tickets[i], false)) missing++;
   PrintFormat("Circles bridge: the box asked for %d deal(s) again; %d of them not in this terminal's history",
               ArraySize(tickets), missing);
}

// ------------------------------------------------------------------ halt
void OnHalt(const string payload) {
   bool halted = false;
   // An empty retained message means the halt was cleared from the broker: nothing halted.
   if(payload != "" && !CbJsonBool(payload, "halted", halted)) {
      // Fail safe, as the simulator does: a halt that cannot be read is a halt.
      Print("Circles bridge: unreadable halt message, halting to be safe: ", payload);
      halted = true;
   }
   g_haltBy = CbJsonText(payload, "by");
   g_haltReason = CbJsonText(payload, "reason");
   if(halted != g_halted)
      PrintFormat("Circles bridge: trading %s by %s: %s", halted ? "HALTED" : "resumed", g_haltBy, g_haltReason);
   g_halted = halted;
   GlobalVariableSet(CB_HALT_GV, halted ? 1.0 : 0.0);
   GlobalVariablesFlush();   // else only a clean terminal shutdown writes it to disk
}

bool Manages(const long magic) {
   for(int i = 0; i < ArraySize(g_magics); i++)
      if(g_magics[i] == magic) return true;
   return false;
}

// A position one of our strategies opened while halted (one that did not ask
// CirclesMayOpen, or lost a race with the halt) is closed at once. An inout deal reverses
// a netting position, which opens one too.
void EnforceHalt(const ulong deal) {
   if(!g_halted) return;
   ENUM_DEAL_ENTRY entry = (ENUM_DEAL_ENTRY)HistoryDealGetInteger(deal, DEAL_ENTRY);
   long magic = HistoryDealGetInteger(deal, DEAL_MAGIC);
   if((entry != DEAL_ENTRY_IN && entry != DEAL_ENTRY_INOUT) || !Manages(magic)) return;
   long positionId = HistoryDealGetInteger(deal, DEAL_POSITION_ID);
   // A position's ticket is usually its identifier, but not after the server re-opens it.
   for(int i = PositionsTotal() - 1; i >= 0; i--) {
      ulong ticket = PositionGetTicket(i);
      if(ticket == 0 || PositionGetInteger(POSITION_IDENTIFIER) != positionId) continue;
      g_trade.SetExpertMagicNumber((ulong)magic);   // the close is booked to the same strategy
      g_trade.SetTypeFillingBySymbol(PositionGetString(POSITION_SYMBOL));
      // Netting: the deal may have added to a position opened before the halt; only
      // what the deal added is taken back. Hedging: the deal's position is its own.
      bool netting = AccountInfoInteger(ACCOUNT_MARGIN_MODE) == ACCOUNT_MARGIN_MODE_RETAIL_NETTING
                     || AccountInfoInteger(ACCOUNT_MARGIN_MODE) == ACCOUNT_MARGIN_MODE_EXCHANGE;
      double added = HistoryDealGetDouble(deal, DEAL_VOLUME);
      bool ok = netting && entry == DEAL_ENTRY_IN && added < PositionGetDouble(POSITION_VOLUME)
                ? g_trade.PositionClosePartial(ticket, added) : g_trade.PositionClose(ticket);
      PrintFormat("Circles bridge: trading is halted; deal %I64u (magic %I64d) opened position %I64u: %s (%s)",
                  deal, magic, ticket, ok ? "closed it" : "closing it FAILED", g_trade.ResultRetcodeDescription());
      return;
   }
   PrintFormat("Circles bridge: trading is halted; deal %I64u (magic %I64d) opened position %I64d, already gone",
               deal, magic, positionId);
}

// ------------------------------------------------------------------ the connection
void Connect() {
   string err = "";
   if(!g_mqtt.Open(InpHost, InpPort, InpTls, err)) { Drop(err); return; }
   uchar pkt[];
   CbMqttConnect(pkt, "circles-ea-" + InpAccount, InpUsername, InpPassword, g_tStatus, "offline", 1, true,
                 CB_KEEPALIVE_S, true);
   if(!g_mqtt.Send(pkt)) { Drop("sending CONNECT failed"); return; }
   g_state = LINK_CONNECTING;
   g_connectSentAt = GetTickCount64();
}

void Drop(const string why) {
   g_mqtt.Close();
   g_state = LINK_OFFLINE;
   g_pingSentAt = 0;
   g_lastError = why;
   g_nextAttempt = GetTickCount64() + g_backoff;
   PrintFormat("Circles bridge: %s; next try in %d s", why, (int)(g_backoff / 1000));
   g_backoff = g_backoff * 2 > BACKOFF_MAX_MS ? BACKOFF_MAX_MS : g_backoff * 2;
}

void ReadPackets() {
   if(!g_mqtt.Poll()) { Drop("connection to the broker lost"); return; }
   int type = 0, flags = 0, r = 0;
   uchar body[];
   while(g_state != LINK_OFFLINE && (r = g_mqtt.Next(type, flags, body)) == 1)
      OnPacket(type, flags, body);
   if(r < 0) Drop("the broker sent something that is not MQTT");
}

void OnPacket(const int type, const int flags, const uchar &body[]) {
   if(type == CB_CONNACK) OnConnack(body);
   else if(type == CB_PUBLISH) OnPublish(flags, body);
   else if(type == CB_PUBACK && ArraySize(body) >= 2) {
      int id = (body[0] << 8) | body[1];
      for(int i = 0; i < ArraySize(g_queue); i++)
         if(g_queue[i].packetId == id) g_queue[i].brokerHas = true;
   }
   else if(type == CB_SUBACK) {
      for(int i = 2; i < ArraySize(body); i++)
         if(body[i] == 0x80) Print("Circles bridge: the broker refused a subscription: is this device of kind mt5?");
   }
   else if(type == CB_PINGRESP) g_pingSentAt = 0;
   else PrintFormat("Circles bridge: ignoring MQTT packet type %d", type);
}

void OnConnack(const uchar &body[]) {
   if(g_state != LINK_CONNECTING || ArraySize(body) < 2) { Drop("unexpected CONNACK"); return; }
   if(body[1] != 0) { Drop("the broker refused the connection: " + CbConnackText(body[1])); return; }
   g_state = LINK_ONLINE;
   g_backoff = BACKOFF_MIN_MS;
   g_lastError = "";
   ushort id;
   uchar pkt[];
   string topics[3];
   topics[0] = g_tAck;
   topics[1] = g_tCmd + "#";
   topics[2] = g_tHalt;
   bool ok = g_mqtt.Publish(g_tStatus, "online", 1, true, id);
   CbMqttSubscribe(pkt, g_mqtt.NextId(), topics, 1);
   if(!ok || !g_mqtt.Send(pkt)) { Drop("sending after CONNACK failed"); return; }
   PrintFormat("Circles bridge: connected to %s:%d as %s", InpHost, InpPort, InpUsername);
   // A clean session keeps nothing in the broker: all that still waits goes again, first
   // (docs/mt5_protocol.md), then the snapshot.
   for(int i = 0; i < ArraySize(g_queue); i++) { g_queue[i].sentAt = 0; g_queue[i].tries = 0; }
   ulong now = GetTickCount64();
   PublishDue(now);
   SendSnapshot(now);
}

void OnPublish(const int flags, const uchar &body[]) {
   string topic, payload;
   ushort id;
   if(!CbMqttReadPublish(flags, body, topic, payload, id)) { Drop("malformed PUBLISH from the broker"); return; }
   if(topic == g_tAck) OnAck(payload);
   else if(topic == g_tHalt) OnHalt(payload);
   else if(StringFind(topic, g_tCmd) == 0) OnCommand(StringSubstr(topic, StringLen(g_tCmd)), payload);
   else PrintFormat("Circles bridge: ignoring a message on %s", topic);
   // Acknowledged only once handled, the queue file already rewritten.
   if(((flags >> 1) & 3) != 1 || g_state != LINK_ONLINE) return;
   uchar pkt[];
   CbMqttPuback(pkt, id);
   if(!g_mqtt.Send(pkt)) Drop("sending PUBACK failed");
}

// PINGREQ when we were quiet for 30 s, and also when the broker was for 60 s: heartbeats
// keep us talking, and a link that died without a word must still be noticed.
void KeepAlive(const ulong now) {
   if(g_pingSentAt != 0) {
      if(now - g_pingSentAt > PING_TIMEOUT_MS) Drop("no PINGRESP from the broker");
      return;
   }
   if(now - g_mqtt.lastSent < PING_IDLE_MS && now - g_mqtt.lastRecv < 2 * PING_IDLE_MS) return;
   uchar pkt[];
   CbMqttPingreq(pkt);
   if(!g_mqtt.Send(pkt)) Drop("sending PINGREQ failed");
   else g_pingSentAt = now;
}

void SendHeartbeat(const ulong now) {
   string json = "{\"ts\":\"" + CbIsoUtc(TimeGMT()) + "\",\"queue\":" + IntegerToString(ArraySize(g_queue))
                 + ",\"halted\":" + (g_halted ? "true" : "false") + ",\"version\":\"" + CB_VERSION + "\"}";
   ushort id;
   g_lastHeartbeat = now;
   if(!g_mqtt.Publish(g_tHeartbeat, json, 0, false, id)) Drop("sending the heartbeat failed");
}

// Every deal ticket of the last InpSnapshotDays (the newest 5000 at most) and those still
// queued, so the box finds what it misses, such as deals made while this EA was not running.
void SendSnapshot(const ulong now) {
   g_lastSnapshot = now;
   // A minute ahead: TimeTradeServer() is an estimate and may trail the deals' own times.
   datetime to = TimeTradeServer() + 60;
   datetime from = (datetime)((long)to - (long)InpSnapshotDays * 86400);
   if(!HistorySelect(from, to)) {
      PrintFormat("Circles bridge: HistorySelect failed, error %d; no snapshot this time", GetLastError());
      return;
   }
   int total = HistoryDealsTotal(), first = total > CB_MAX_TICKETS ? total - CB_MAX_TICKETS : 0;
   long fromMsc = (long)from * 1000;
   ulong tickets[], pending[];
   for(int i = first; i < total; i++) {
      ulong t = HistoryDealGetTicket(i);
      if(t == 0) continue;
      CbPushTicket(tickets, t);
      long msc = HistoryDealGetInteger(t, DEAL_TIME_MSC);
      if(first > 0 && (ArraySize(tickets) == 1 || msc < fromMsc)) fromMsc = msc;   // cut: the oldest sent
   }
   for(int i = 0; i < ArraySize(g_queue) && i < CB_MAX_TICKETS; i++) CbPushTicket(pending, g_queue[i].ticket);
   string json = "{\"from_msc\":" + IntegerToString(fromMsc) + ",\"to_msc\":" + IntegerToString((long)to * 1000)
                 + ",\"tickets\":" + CbTicketList(tickets) + ",\"pending\":" + CbTicketList(pending)
                 + ",\"gmt_offset_s\":" + IntegerToString(CbGmtOffset()) + "}";
   ushort id;
   if(!g_mqtt.Publish(g_tSnapshot, json, 1, false, id)) Drop("sending the snapshot failed");
}

// ------------------------------------------------------------------ inputs and the chart
bool ValidAccount(const string s) {
   if(StringLen(s) < 1 || StringLen(s) > 63) return false;
   for(int i = 0; i < StringLen(s); i++) {
      ushort c = StringGetCharacter(s, i);
      if(!((c >= 'a' && c <= 'z') || (c >= '0' && c <= '9') || c == '-' || c == '_')) return false;
   }
   return true;
}

bool ParseMagics(const string text) {
   string parts[];
   ArrayResize(g_magics, 0);
   int n = StringSplit(text, ',', parts);
   for(int i = 0; i < n; i++) {
      string p = parts[i];
      StringTrimLeft(p);
      StringTrimRight(p);
      if(p == "") continue;
      for(int k = 0; k < StringLen(p); k++)
         if(StringGetCharacter(p, k) < '0' || StringGetCharacter(p, k) > '9') return false;
      int m = ArraySize(g_magics);
      ArrayResize(g_magics, m + 1);
      g_magics[m] = StringToInteger(p);
   }
   return true;
}

void ShowChart() {
   string link = g_state == LINK_ONLINE ? "connected" : "connecting";
   if(g_state == LINK_OFFLINE) {
      ulong now = GetTickCount64();
      link = StringFormat("offline, next try in %d s", g_nextAttempt > now ? (int)((g_nextAttempt - now + 999) / 1000) : 0);
      if(g_lastError != "") link += " (" + g_lastError + ")";
   }
   int brokerHas = 0;
   for(int i = 0; i < ArraySize(g_queue); i++)
      if(g_queue[i].brokerHas) brokerHas++;
   string halt = "Trading: allowed";
   if(g_halted)
      halt = "Trading: HALTED, no new positions for magic " + InpMagics
             + (g_haltBy != "" ? " (by " + g_haltBy + (g_haltReason != "" ? ": " + g_haltReason : "") + ")" : "");
   string text = StringFormat("Circles bridge %s   %s -> %s:%d%s\nBox: %s\n%s\nQueue: %d deal(s) waiting for the ledger (%d of them with the broker)",
                              CB_VERSION, InpAccount, InpHost, InpPort, InpTls ? " TLS" : "", link, halt,
                              ArraySize(g_queue), brokerHas);
   if(text != g_chart) { Comment(text); g_chart = text; }
}
