//! The request-response codec for peer RPC: one bincode message per stream direction,
//! bounded by [`MAX_RPC_BYTES`] while reading.

use std::io;

use colony_protocol::names::{MAX_RPC_BYTES, RPC_PROTOCOL};
use colony_protocol::{Request, Response};
use futures::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use libp2p::StreamProtocol;

pub const PROTOCOL: StreamProtocol = StreamProtocol::new(RPC_PROTOCOL);

#[derive(Clone, Debug, Default)]
pub struct RpcCodec;

/// Reads the whole stream, refusing more than `MAX_RPC_BYTES`.
async fn read_bounded<T: AsyncRead + Unpin + Send>(io: &mut T) -> io::Result<Vec<u8>> {
    let mut buf = Vec::new();
    io.take(MAX_RPC_BYTES as u64 + 1).read_to_end(&mut buf).await?;
    if buf.len() > MAX_RPC_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("message exceeds the limit of {MAX_RPC_BYTES} bytes"),
        ));
    }
    Ok(buf)
}

fn invalid(e: impl std::fmt::Display) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, e.to_string())
}

impl libp2p::request_response::Codec for RpcCodec {
    type Protocol = StreamProtocol;
    type Request = Request;
    type Response = Response;

    async fn read_request<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Request>
    where
        T: AsyncRead + Unpin + Send,
    {
        Request::from_bytes(&read_bounded(io).await?).map_err(invalid)
    }

    async fn read_response<T>(&mut self, _: &StreamProtocol, io: &mut T) -> io::Result<Response>
    where
        T: AsyncRead + Unpin + Send,
    {
        Response::from_bytes(&read_bounded(io).await?).map_err(invalid)
    }

    async fn write_request<T>(&mut self, _: &StreamProtocol, io: &mut T, req: Request) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&req.to_bytes().map_err(invalid)?).await?;
        io.close().await
    }

    async fn write_response<T>(&mut self, _: &StreamProtocol, io: &mut T, res: Response) -> io::Result<()>
    where
        T: AsyncWrite + Unpin + Send,
    {
        io.write_all(&res.to_bytes().map_err(invalid)?).await?;
        io.close().await
    }
}
